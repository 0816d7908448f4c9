"""The IR verifier: structural invariants every pass must keep. The pipeline runs it between passes when asked
(`compile_spec(..., verify=True)`, or ARCHGEN_VERIFY_IR=1; the tests turn it on), tinygrad-style.

Checks: the graph is a DAG whose execution order is a topological order holding every node exactly once; every op's
kind is registered and its parameter table is the one its kind computes from its config; shapes, once inferred, are
set on every op and agree with their producers; a chosen kernel belongs to a known rule for the op's kind.
"""

from __future__ import annotations

import networkx as nx

from archgen.errors import CompileError, Diagnostic
from archgen.ir.graph import IR
from archgen.kinds import KINDS


def verify_ir(ir: IR, after: str) -> IR:
    problems: list[str] = []
    graph = ir.graph
    if not nx.is_directed_acyclic_graph(graph):
        problems.append("the graph has a cycle")
    if sorted(ir.order) != sorted(graph.nodes) or len(set(ir.order)) != len(ir.order):
        problems.append("the execution order does not hold every node exactly once")
    position = {name: i for i, name in enumerate(ir.order)}
    shaped = any(ir.op(name).out_shape is not None for name in ir.order)
    for name in ir.order:
        op = ir.op(name)
        if op.name != name:
            problems.append(f"node {name} holds op {op.name}")
        if op.kind not in KINDS:
            problems.append(f"{name}: unknown kind '{op.kind}'")
            continue
        if op.params != KINDS[op.kind].parameters(op.config, ir.dims):
            problems.append(f"{name}: its parameter table is not what kind '{op.kind}' computes from its config")
        for source in graph.predecessors(name):
            if position.get(source, len(ir.order)) >= position[name]:
                problems.append(f"{name}: input {source} runs after it")
        if shaped:
            if op.out_shape is None:
                problems.append(f"{name}: no output shape after shape inference")
            elif [ir.op(s).out_shape for s in graph.predecessors(name)] not in ([], op.in_shapes):
                problems.append(f"{name}: its input shapes are not its producers' output shapes")
        for function, kernel in op.kernels.items():
            from archgen.passes.kernels import KERNEL_RULES

            if function != kernel.function or not any(
                    r.kind == op.kind and r.file == kernel.file and r.function == function for r in KERNEL_RULES):
                problems.append(f"{name}: kernel {kernel.file}.{function} has no rule for kind '{op.kind}'")
    if problems:
        fix = "this is an archgen bug: please report it with the spec"
        raise CompileError([Diagnostic("", f"invalid IR after {after}: {problem}", fix)
                            for problem in problems])
    return ir
