"""ONNX from the torch.export program: converted by torch.onnx's dynamo exporter, dims renamed, checked, runnable.

The exporter names dynamic dims after its own symbols (s25); they are renamed to the manifest's names ("batch",
"seq") in the inputs, outputs and intermediate shapes, so the file documents itself. Weights are stored inside the
file below 1 GiB and as external data (<file>.data) above.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.export import ExportedProgram

from archgen.export.failures import explain
from archgen.export.package import Package
from archgen.export.torch_export import Graph

INLINE_WEIGHTS_LIMIT = 1 << 30


def export_onnx(program: ExportedProgram, graph: Graph, path: Path, opset: int, package: Package, model) -> Path:
    """Convert, rename dims, save to `path`, and check with onnx.checker (full check). Returns the path."""
    import onnx

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
    weight_bytes = sum(t.nbytes for t in program.state_dict.values()) + sum(
        t.nbytes for t in program.constants.values() if isinstance(t, torch.Tensor))
    external = weight_bytes > INLINE_WEIGHTS_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data" if external else None)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _rename_dims(proto, graph: Graph) -> None:
    """Give the exporter's symbolic dims the names of the manifest, everywhere they appear."""
    renames: dict[str, str] = {}
    for values, tensors in ((proto.graph.input, graph.inputs), (proto.graph.output, graph.outputs)):
        for value, shape in zip(values, tensors.shapes):
            for dim, ours in zip(value.type.tensor_type.shape.dim, shape):
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
    feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(graph.inputs.names, args)}
    return [torch.from_numpy(array) for array in session.run(None, feeds)]
