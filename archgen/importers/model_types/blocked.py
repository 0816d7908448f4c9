"""Model types transformers has that the spec language cannot yet express exactly, with the fields that block each.

An import of one of these is an error that names what is missing, never an approximation.
"""

BLOCKED = {
    "qwen3_next": "Qwen3-Next's attention gates its output by the sigmoid of a second half of q_proj, its RMSNorms "
    "scale by (1 + weight), and its MoE weights the shared expert by sigmoid(shared_expert_gate(x)); the attention, "
    "norm and moe kinds have none of these (the gated_deltanet kind is its linear-attention layer, not yet checked "
    "against Qwen3NextGatedDeltaNet's fused in_proj_qkvz / in_proj_ba layout)",
}
