"""archgen's Triton kernels, the package archgen_kernels (the repository's kernels/ folder; see archgen/resources.py).

One file per op (its kernels, launchers, autotune space, custom op with fake and autograd, and PyTorch reference) and
triton_support.py, the plumbing they share. Importing this package imports nothing; importing an op file needs
triton. Generated packages carry copies of the op files they use, with triton_support.py, in their kernels/ folder.
"""
