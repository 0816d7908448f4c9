"""Triton kernels hymba_plus runs on CUDA tensors, copied from archgen's kernels/. Do not edit.

Where triton cannot be imported (a CPU-only install) each name is None, and the model runs the reference op of the
same name in ops/, which is also what exported graphs hold.
"""

try:
    from .selective_scan import selective_scan
except ImportError:  # no triton
    selective_scan = None
