"""Shape inference over the IR: every op gets its input and output shapes, symbolic in batch B and length T (the
generated code's names). The emitter prints them as the shape comments of the blocks and the model.

Each kind says what it outputs (`output_shape`, the input shape by default). With meta tokens the sequence inside the
backbone is "T+M" (M literal) until `drop_meta` removes their positions. An op with several inputs (a residual
addition, a parallel combine) needs them to agree; a disagreement is an error naming the op.
"""

from __future__ import annotations

from archgen.errors import CompileError, Diagnostic
from archgen.ir.graph import IR
from archgen.kinds import kind_of

INPUT_SHAPE = ("B", "T")  # token ids


def infer_shapes(ir: IR) -> IR:
    problems: list[Diagnostic] = []
    for op in ir.ops():
        op.in_shapes = [source.out_shape for source in ir.inputs(op.name)] or [INPUT_SHAPE]
        if len(set(op.in_shapes)) > 1:
            problems.append(Diagnostic(op.spec_path or "layout.mixers", f"{op.name}: inputs disagree in shape: {op.in_shapes}",
                                       "every parallel branch must map (B, L, d_model) to (B, L, d_model)"))
            continue
        op.out_shape = tuple(kind_of(op.kind).output_shape(op.config, ir.dims, op.in_shapes))
    if problems:
        raise CompileError(problems)
    return ir
