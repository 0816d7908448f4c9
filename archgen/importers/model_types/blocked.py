"""Model types transformers has that the spec language cannot yet express exactly, with the fields that block each.

An import of one of these is an error that names what is missing, never an approximation.
"""

BLOCKED = {
    "falcon_h1": "Falcon-H1 runs attention and Mamba-2 side by side on one normed input in every layer and adds their "
    "outputs after per-branch multipliers (attention_in_multiplier, attention_out_multiplier, ssm_out_multiplier); it "
    "also scales the Mamba-2 input (ssm_in_multiplier) and five sections of its in_proj output (ssm_multipliers), the "
    "keys (key_multiplier), the MLP's gate and output (mlp_multipliers) and the logits by a product "
    "(lm_head_multiplier), and its Mamba-2 may be mamba_d_ssm wide (not expand·hidden_size) with an optional gated "
    "norm (mamba_rms_norm, mamba_norm_before_gate). The spec language has model.embedding_multiplier, but its "
    "parallel mixers combine by a normalized mean or a plain sum without branch scales, the mamba2 kind's width is "
    "expand·d_model, and it has none of the other multipliers",
    "qwen3_next": "Qwen3-Next's attention gates its output by the sigmoid of a second half of q_proj, its RMSNorms "
    "scale by (1 + weight), and its MoE weights the shared expert by sigmoid(shared_expert_gate(x)); the attention, "
    "norm and moe kinds have none of these (the gated_deltanet kind is its linear-attention layer, not yet checked "
    "against Qwen3NextGatedDeltaNet's fused in_proj_qkvz / in_proj_ba layout)",
}
