"""IR -> IR passes, run in this order by `archgen.pipeline`."""

from archgen.passes.shapes import infer_shapes

PASSES = [infer_shapes]
