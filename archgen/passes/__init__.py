"""IR -> IR passes, run in this order by `archgen.pipeline` (the verifier between them when asked).

    infer_shapes    every op's input and output shapes (the templates print them as shape comments)
    select_kernels  which op runs which Triton kernel (passes/kernels.py: KERNEL_RULES)

The cost report (passes/cost.py) reads the finished IR and changes nothing; the emitter calls it.
"""

from archgen.passes.kernels import select_kernels
from archgen.passes.shapes import infer_shapes

PASSES = [infer_shapes, select_kernels]
