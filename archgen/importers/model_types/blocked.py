"""Model types transformers has that the spec language cannot yet express exactly, with the fields that block each.

An import of one of these is an error that names what is missing, never an approximation.
"""

BLOCKED = {
    "falcon_h1": "Falcon-H1 scales embeddings, attention, SSM and MLP by per-block multipliers (embedding_multiplier, "
    "key_multiplier, ssm_multipliers, mlp_multipliers, lm_head_multiplier, ...) and runs attention and "
    "Mamba-2 in parallel with its own combination, none of which the spec language has",
    "granitemoehybrid": "GraniteMoeHybrid scales embeddings, residuals, attention and logits (embedding_multiplier, "
    "residual_multiplier, attention_multiplier, logits_scaling), which the spec language has no fields for",
    "qwen3_next": "Qwen3-Next's linear-attention layers are Gated DeltaNet, and its attention has an output gate; "
    "the spec language has neither kind",
}
