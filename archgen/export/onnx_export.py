"""ONNX from the torch.export program: converted by torch.onnx's dynamo exporter, dims renamed, checked, runnable.

The exporter names dynamic dims after its own symbols (s25); they are renamed to the manifest's names ("batch",
"seq") in the inputs, outputs and intermediate shapes, so the file documents itself.

Weights. The prefill and decode graphs use the same weights, so they are written once, as ONNX external data in
one file (`weights.onnx.data`) that both graphs point into; the .onnx files hold only the graphs and small
constants. Each tensor starts at a multiple of 4096 bytes (64 for small ones), so a runtime can map the file
instead of copying it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.export import ExportedProgram

from archgen.export.failures import explain
from archgen.export.package import Package
from archgen.export.torch_export import Graph, shape_semantics

if TYPE_CHECKING:
    import onnx

WEIGHTS_FILE = "weights.onnx.data"
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors (shapes, scalars) stay inside the graph file


def export_onnx(program: ExportedProgram, graph: Graph, opset: int, package: Package, model):
    """Convert the program to an ONNX ModelProto with the manifest's input, output and dim names (not yet saved)."""
    program = lower_kernels(program, package)
    try:
        # The converter reports its progress on stdout and warns about its own deprecated internals.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            converted = torch.onnx.export(program, (), dynamo=True, opset_version=opset, input_names=graph.inputs.names,
                                          output_names=graph.outputs.names, optimize=True, verbose=False)
    except Exception as error:  # noqa: BLE001 - explained and re-raised
        raise explain(error, package=package, model=model, graph=graph.name, stage="ONNX", program=program) from error
    proto = converted.model_proto
    _rename_dims(proto, graph)
    return proto


def lower_kernels(program: ExportedProgram, package: Package) -> ExportedProgram:
    """The program with the package's Triton custom ops (one node each in the .pt2) replaced by their reference ops,
    as the package's kernels.decompositions() writes them: an ONNX runtime has no Triton. This re-traces the program,
    under the export's shape semantics: without them the re-trace fixes sizes the export left symbolic at their
    example values (a prefill traced at one chunk of a chunked scan then gathers past its tensors' end at two)."""
    if not (Path(package.module.__path__[0]) / "kernels").is_dir():
        return program
    kernels = importlib.import_module(f"{package.module.__name__}.kernels")
    table = kernels.decompositions()
    if not any(node.target in table for node in program.graph.nodes):
        return program
    with shape_semantics():
        return program.run_decompositions(table)


def save_onnx(protos: dict[str, onnx.ModelProto], directory: Path) -> dict[str, str]:
    """Write each graph to directory/<name>.onnx with its weights in the shared WEIGHTS_FILE, then check every file
    with onnx.checker (full check). Tensors with the same bytes are stored once, whatever their names: the
    exporter's constant folding gives a weight's transposed or sliced copies a different name in each graph.
    Returns graph name -> file name."""
    import onnx
    from onnx.external_data_helper import set_external_data

    stored: dict[bytes, tuple[int, int]] = {}  # sha256 of the bytes -> (offset, length)
    with open(directory / WEIGHTS_FILE, "wb") as data:
        for proto in protos.values():
            for tensor in proto.graph.initializer:
                if len(tensor.raw_data) < EXTERNAL_THRESHOLD:
                    continue
                raw = tensor.raw_data
                key = hashlib.sha256(raw).digest()
                if key not in stored:
                    align = 4096 if len(raw) >= 65536 else 64
                    data.write(b"\0" * (-data.tell() % align))
                    stored[key] = (data.tell(), len(raw))
                    data.write(raw)
                offset, length = stored[key]
                set_external_data(tensor, location=WEIGHTS_FILE, offset=offset, length=length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
    files = {}
    for name, proto in protos.items():
        path = directory / f"{name}.onnx"
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        files[name] = path.name
    return files


def _rename_dims(proto, graph: Graph) -> None:
    """Give the exporter's symbolic dims the names of the manifest, everywhere they appear."""
    renames: dict[str, str] = {}
    for values, tensors in ((proto.graph.input, graph.inputs), (proto.graph.output, graph.outputs)):
        for value, shape in zip(values, tensors.shapes, strict=True):
            for dim, ours in zip(value.type.tensor_type.shape.dim, shape, strict=True):
                if isinstance(ours, str) and dim.dim_param:
                    renames.setdefault(dim.dim_param, ours)
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def onnx_session(path: Path):
    """An onnxruntime session on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, graph: Graph, args: tuple) -> list[torch.Tensor]:
    """Run a session on the flat inputs of `graph` (tensors), returning torch tensors."""
    feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(graph.inputs.names, args, strict=True)}
    return [torch.from_numpy(array) for array in session.run(None, feeds)]
