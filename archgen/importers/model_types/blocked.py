"""Model types transformers has that the spec language cannot yet express exactly, with the fields that block each.

An import of one of these is an error that names what is missing, never an approximation.
"""

BLOCKED = {
    "zamba2": "Zamba2 runs one or two shared attention+MLP blocks at many depths (hybrid_layer_ids), the same weights at "
    "each, with per-use LoRA adapters on their projections (use_shared_attention_adapter), on the hidden states "
    "concatenated with the original embeddings; the spec language has no weights shared between layers",
}
