"""Triton kernels nexus runs on CUDA tensors, copied from archgen's kernels/ (the package archgen_kernels)
with triton_support.py, the autotuning and op registration they share. Do not edit.

Where triton cannot be imported (a CPU-only install) each name is None, and the model runs the reference op of the
same name in ops/. Each kernel is a torch.library custom op, so an exported program keeps it as one node;
`decompositions()` writes those ops with the reference ops, for exporters that cannot run Triton (ONNX).

Launch configs: importing or running this package never tunes. A kernel runs the config pinned for this GPU, torch,
triton and shape in tuning.json (written here by `archgen build SPEC --autotune` on a GPU, loaded at import), or else
its default config, with one warning per process (triton_support.UNTUNED lists the shapes that ran untuned).
"""

try:
    from . import triton_support
    from . import causal_conv1d as causal_conv1d_module
    from . import decode_attention as decode_attention_module
    from . import gemv as gemv_module
    from . import greedy_pick as greedy_pick_module
    from . import in_proj_conv as in_proj_conv_module
    from . import qkv_rope as qkv_rope_module
    from . import rmsnorm as rmsnorm_module
    from . import rope as rope_module
    from . import selective_scan as selective_scan_module
    from . import silu_mul as silu_mul_module
    from . import state_update as state_update_module
    from .causal_conv1d import causal_conv1d
    from .causal_conv1d import causal_conv1d_update_
    from .decode_attention import decode_attention
    from .decode_attention import decode_attention_one_launch
    from .gemv import linear
    from .gemv import qkv_linear
    from .gemv import residual_linear
    from .gemv import swiglu_linear
    from .greedy_pick import greedy_pick_
    from .in_proj_conv import in_proj_conv_step_
    from .qkv_rope import qkv_rope_write_kv_
    from .rmsnorm import rms_norm
    from .rope import apply_rope_qk
    from .rope import apply_rope_write_kv
    from .rope import rope_cos_sin
    from .selective_scan import selective_scan
    from .silu_mul import silu_mul
    from .state_update import mamba_step_low_rank
except ImportError:  # no triton
    triton_support = None
    causal_conv1d_module = None
    decode_attention_module = None
    gemv_module = None
    greedy_pick_module = None
    in_proj_conv_module = None
    qkv_rope_module = None
    rmsnorm_module = None
    rope_module = None
    selective_scan_module = None
    silu_mul_module = None
    state_update_module = None
    causal_conv1d = None
    causal_conv1d_update_ = None
    decode_attention = None
    decode_attention_one_launch = None
    linear = None
    qkv_linear = None
    residual_linear = None
    swiglu_linear = None
    greedy_pick_ = None
    in_proj_conv_step_ = None
    qkv_rope_write_kv_ = None
    rms_norm = None
    apply_rope_qk = None
    apply_rope_write_kv = None
    rope_cos_sin = None
    selective_scan = None
    silu_mul = None
    mamba_step_low_rank = None
else:
    triton_support.RUNTIME_TUNING = False


def decompositions() -> dict:
    """{custom op: the same computation with the reference ops in ops/}, for every kernel that imported."""
    table = {}
    if causal_conv1d_module is not None:
        from ..ops.ssm import causal_conv1d as reference

        table.update(causal_conv1d_module.decomposition(reference, max_seqlen=4096))
    if causal_conv1d_module is not None:
        from ..ops.ssm import causal_conv1d_update_ as reference

        table.update(causal_conv1d_module.decomposition(reference, max_seqlen=4096))
    if decode_attention_module is not None:
        from ..ops.attention import decode_attention as reference

        table.update(decode_attention_module.decomposition(reference, max_seqlen=4096))
    if decode_attention_module is not None:
        from ..ops.attention import decode_attention_one_launch as reference

        table.update(decode_attention_module.decomposition(reference, max_seqlen=4096))
    if gemv_module is not None:
        from ..ops.linear import linear as reference

        table.update(gemv_module.decomposition(reference, max_seqlen=4096))
    if gemv_module is not None:
        from ..ops.linear import qkv_linear as reference

        table.update(gemv_module.decomposition(reference, max_seqlen=4096))
    if gemv_module is not None:
        from ..ops.linear import residual_linear as reference

        table.update(gemv_module.decomposition(reference, max_seqlen=4096))
    if gemv_module is not None:
        from ..ops.linear import swiglu_linear as reference

        table.update(gemv_module.decomposition(reference, max_seqlen=4096))
    if greedy_pick_module is not None:
        from ..ops.decoding import greedy_pick_ as reference

        table.update(greedy_pick_module.decomposition(reference, max_seqlen=4096))
    if in_proj_conv_module is not None:
        from ..ops.ssm import in_proj_conv_step_ as reference

        table.update(in_proj_conv_module.decomposition(reference, max_seqlen=4096))
    if rmsnorm_module is not None:
        from ..ops.norm import rms_norm as reference

        table.update(rmsnorm_module.decomposition(reference, max_seqlen=4096))
    if rope_module is not None:
        from ..ops.attention import apply_rope_qk as reference

        table.update(rope_module.decomposition(reference, max_seqlen=4096))
    if rope_module is not None:
        from ..ops.attention import apply_rope_write_kv as reference

        table.update(rope_module.decomposition(reference, max_seqlen=4096))
    if rope_module is not None:
        from ..ops.attention import rope_cos_sin as reference

        table.update(rope_module.decomposition(reference, max_seqlen=4096))
    if selective_scan_module is not None:
        from ..ops.ssm import selective_scan as reference

        table.update(selective_scan_module.decomposition(reference, max_seqlen=4096))
    if silu_mul_module is not None:
        from ..ops.mlp import silu_mul as reference

        table.update(silu_mul_module.decomposition(reference, max_seqlen=4096))
    if state_update_module is not None:
        from ..ops.ssm import mamba_step_low_rank as reference

        table.update(state_update_module.decomposition(reference, max_seqlen=4096))
    return table
