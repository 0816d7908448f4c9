"""Shape inference over the IR: every op gets its input and output shapes, symbolic in batch B and length L.

With meta tokens the sequence inside the backbone is "L+M" (M literal). Parallel branches must agree on their
output shape before they are combined; a disagreement is an error naming the layer.
"""

from __future__ import annotations

from archgen.errors import CompileError, Diagnostic
from archgen.ir.graph import IR, Shape


def infer_shapes(ir: IR) -> IR:
    d, vocab = ir.dims.d_model, ir.dims.vocab_size
    problems: list[Diagnostic] = []
    for op in ir.ops():
        op.in_shapes = [ir.op(source).out_shape for source in ir.graph.predecessors(op.name)]
        if op.kind == "embedding":
            op.in_shapes = [("B", "L")]
            op.out_shape = ("B", "L", d)
            continue
        first = op.in_shapes[0]
        if op.kind in ("add", "parallel_combine") and len(set(op.in_shapes)) > 1:
            problems.append(Diagnostic("layout.mixers", f"{op.name}: inputs disagree in shape: {op.in_shapes}",
                                       "every parallel branch must map (B, L, d_model) to (B, L, d_model)"))
        seq = first[1]
        if op.kind == "meta_tokens":
            op.out_shape = ("B", f"L+{op.cfg.count}", d)
        elif op.kind == "lm_head":
            op.out_shape = ("B", seq, vocab)
        elif op.kind == "medusa":
            op.out_shape = (op.cfg.n_heads, "B", seq, vocab)
        elif op.kind == "jepa":
            op.out_shape = ("B", seq, op.cfg.latent_dim or d)
        elif op.kind == "forecaster":
            op.out_shape = ("B", seq, op.cfg.n_bins)
        else:
            op.out_shape = _same(first)
    if problems:
        raise CompileError(problems)
    return ir


def _same(shape: Shape) -> Shape:
    return tuple(shape)
