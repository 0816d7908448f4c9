"""Turn an exporter's exception into a message that names the layer, the op and the spec component.

torch.export (non-strict) runs the generated model's Python on fake tensors, so most failures happen inside a frame
of the model: the innermost frame whose `self` is a module of the model names the layer, the innermost frame outside
torch names the line (the op). ONNX conversion fails on a node of the exported graph, whose metadata carries the same
two facts. A shape guard that contradicts a dynamic dim is only reported once tracing ends; `guard_sites` re-traces
while recording where each guard was added.
"""

from __future__ import annotations

import inspect
import re
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from archgen.export.package import Package

TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class ExportError(Exception):
    """An export that failed, explained: which graph, which layer (and its spec component), which op, and why."""


@dataclass(frozen=True)
class Site:
    module_path: str | None  # "layers.3.mixer.ssm", or None when no module of the model was on the stack
    code: str | None  # the source line, e.g. "if y.sum() > 0:"
    where: str | None  # "model.py:87 in Ssm.forward"
    op: str | None = None  # an ATen op, when the failure is on a node of the exported graph


def explain(error: BaseException, *, package: Package, model: nn.Module, graph: str, stage: str,
            program: torch.export.ExportedProgram | None = None, sites: list[tuple[str, Site]] | None = None) -> ExportError:
    """An ExportError for `error`, raised while exporting `graph` ("prefill" or "decode") at `stage`."""
    reason = _first_line(error)
    located = [("", site) for site in [_site_from_traceback(error, model)] if site.module_path or site.code]
    if program is not None:
        node_site = _site_from_graph_node(error, program)
        if node_site is not None:
            located = [("", node_site)]
    if sites:
        located = sites
    lines = [f"cannot export the {graph} graph of {package.label} to {stage}"]
    if not located:
        lines.append("  layer: not found on the stack (the failure is outside the model's modules)")
    for guard, site in located[:5]:
        layer = site.module_path or "?"
        spec = package.spec_path_of(site.module_path) if site.module_path is not None else "?"
        lines.append(f"  layer: {layer}  <- spec {spec}")
        if site.op:
            lines.append(f"  op:    {site.op}" + (f"  (`{site.code}`, {site.where})" if site.code else ""))
        elif site.code:
            lines.append(f"  op:    `{site.code}`  ({site.where})")
        if guard:
            lines.append(f"  guard: {guard}")
    lines.append(f"  error: {reason}")
    lines.append(f"  fix:   {_fix(error, reason)}")
    return ExportError("\n".join(lines))


@contextmanager
def guard_sites(model: nn.Module, found: list[tuple[str, Site]]):
    """Record, while tracing, every shape guard torch.export adds and the model line that added it.

    Used only to explain a failure: it re-runs the export with ShapeEnv._log_guard wrapped. Guards that merely equate
    two symbols (the same dim of two inputs) are left out.
    """
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    original = ShapeEnv._log_guard
    names = {id(module): name for name, module in model.named_modules()}

    def recording(self, prefix, g, forcing_spec):
        text = str(g)
        if prefix == "eval" and not re.fullmatch(r"Eq\(s\d+, s\d+\)", text):
            site = _site_from_frames([info.frame for info in inspect.stack(context=1)], names)
            if site.module_path is not None and all(text != seen for seen, _ in found):
                found.append((text, site))
        return original(self, prefix, g, forcing_spec)

    ShapeEnv._log_guard = recording
    try:
        yield found
    finally:
        ShapeEnv._log_guard = original


def _site_from_traceback(error: BaseException, model: nn.Module) -> Site:
    names = {id(module): name for name, module in model.named_modules()}
    best = Site(None, None, None)
    for exc in _chain(error):
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
        site = _site_from_frames(list(reversed(frames)), names)
        if site.module_path is not None:
            return site
        if best.code is None:
            best = site
    return best


def _site_from_frames(frames, names: dict[int, str]) -> Site:
    """frames innermost first: the innermost model module, and the innermost line outside torch and archgen.export."""
    module_path = code = where = None
    for frame in frames:
        filename = frame.f_code.co_filename
        outside = not filename.startswith(TORCH_DIR) and "archgen/export" not in filename.replace("\\", "/") \
            and not filename.startswith("<")
        if code is None and outside:
            code = _source_line(filename, frame.f_lineno)
            where = f"{Path(filename).name}:{frame.f_lineno} in {frame.f_code.co_name}"
        owner = frame.f_locals.get("self")
        if module_path is None and isinstance(owner, nn.Module) and id(owner) in names and names[id(owner)]:
            module_path = names[id(owner)]
        if module_path is not None and code is not None:
            break
    return Site(module_path, code, where)


def _site_from_graph_node(error: BaseException, program: torch.export.ExportedProgram) -> Site | None:
    """The node an ONNX conversion error names (`node %sort ... target=torch.ops.aten.sort.stable`).

    The converter works on the decomposed program, whose node names differ from the exported one's, so the lookup
    decomposes it again (only on this failure path); nodes keep their module stack and source line through that.
    """
    text = "\n".join(str(exc) for exc in _chain(error))
    names = re.findall(r"%(\w+)", text)
    if not names:
        return None
    targets = set(re.findall(r"target=torch\.ops\.([\w.]+)", text))
    site = _find_node(program, names, targets)
    if site is None:
        from archgen.export.torch_export import shape_semantics  # imports this module

        try:
            with shape_semantics(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecated internals
                site = _find_node(program.run_decompositions(), names, targets)
        except Exception:  # noqa: BLE001 - locating is best effort
            site = None
    return site


def _find_node(program: torch.export.ExportedProgram, names: list[str], targets: set[str]) -> Site | None:
    nodes = {node.name: node for node in program.graph.nodes}
    for name in names:
        node = nodes.get(name)
        if node is None or node.op != "call_function" or (targets and str(node.target) not in targets):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module_path = None
        if stack:
            path, _ = list(stack.values())[-1]
            module_path = re.sub(r"^(L\['self'\]\.)?model\.?", "", path).replace("L['self'].", "")
        trace = (node.meta.get("stack_trace") or "").strip().splitlines()
        code = trace[-1].strip() if trace else None
        where = None
        for line in reversed(trace):
            match = re.match(r'\s*File "(.+)", line (\d+), in (\w+)', line)
            if match:
                where = f"{Path(match[1]).name}:{match[2]} in {match[3]}"
                break
        return Site(module_path, code, where, op=str(node.target))
    return None


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _source_line(filename: str, lineno: int) -> str | None:
    try:
        return Path(filename).read_text(encoding="utf-8").splitlines()[lineno - 1].strip()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _first_line(error: BaseException) -> str:
    """The first informative line of the root cause (the converter wraps its reason in generic exceptions)."""
    for exc in reversed(list(_chain(error))):
        for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines():
            line = line.strip()
            if line and not line.startswith(("For more information", "The error above", "For C++ stack trace")):
                return f"{type(exc).__name__}: {line[:400]}"
    return type(error).__name__


def _fix(error: BaseException, reason: str) -> str:
    text = " ".join(str(exc) for exc in _chain(error))
    if "data-dependent" in text or "GuardOnDataDependent" in type(error).__name__:
        return ("the layer branches in Python on a tensor's value; write the branch as tensor arithmetic "
                "(torch.where, a mask, fixed-capacity buffers) so that one graph holds for every input")
    if "Constraints violated" in text:
        return ("a shape decision depends on the exact size of a dynamic dim (often 'is it 1?'); avoid reshaping "
                "non-contiguous tensors there, or export with that dim static (--dynamic)")
    if "No ONNX function found" in text or "ConversionError" in type(error).__name__:
        return "the op has no ONNX lowering; rewrite it with ops ONNX has (or export --format pt2 only)"
    return "see the error; `archgen export --traceback` prints the exporter's own stack trace"
