"""Triton kernels hspmn runs on CUDA tensors, copied from archgen's kernels/ (the package archgen_kernels)
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
    from . import gemv as gemv_module
    from . import greedy_pick as greedy_pick_module
    from . import packed_query_attention as packed_query_attention_module
    from . import rmsnorm as rmsnorm_module
    from . import silu_mul as silu_mul_module
    from .gemv import linear
    from .gemv import residual_linear
    from .gemv import swiglu_linear
    from .greedy_pick import greedy_pick_
    from .packed_query_attention import packed_query_attention
    from .rmsnorm import rms_norm
    from .silu_mul import silu_mul
except ImportError:  # no triton
    triton_support = None
    gemv_module = None
    greedy_pick_module = None
    packed_query_attention_module = None
    rmsnorm_module = None
    silu_mul_module = None
    linear = None
    residual_linear = None
    swiglu_linear = None
    greedy_pick_ = None
    packed_query_attention = None
    rms_norm = None
    silu_mul = None
else:
    triton_support.RUNTIME_TUNING = False


def decompositions() -> dict:
    """{custom op: the same computation with the reference ops in ops/}, for every kernel that imported."""
    table = {}
    if gemv_module is not None:
        from ..ops.linear import linear as reference

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
    if packed_query_attention_module is not None:
        from ..ops.routing import packed_query_attention as reference

        table.update(packed_query_attention_module.decomposition(reference, max_seqlen=4096))
    if rmsnorm_module is not None:
        from ..ops.norm import rms_norm as reference

        table.update(rmsnorm_module.decomposition(reference, max_seqlen=4096))
    if silu_mul_module is not None:
        from ..ops.mlp import silu_mul as reference

        table.update(silu_mul_module.decomposition(reference, max_seqlen=4096))
    return table
