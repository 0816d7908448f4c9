"""`archgen export-spec SPEC -o DIR [--weights W]`: a spec that is exactly a transformers model type, written as that
type's config.json (and, from a save_pretrained directory of the generated package, its checkpoint).

The checkpoint names come from the same `TensorPlan`s the import uses, run backwards, so a name can only be wrong in
one place. A spec that is not exactly one of the model types gets the reasons for each, never a near match.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from archgen.emit.write import replace_directory
from archgen.errors import CompileError, Diagnostic, SourceLocation
from archgen.importers.model_types import registry

EXPORTABLE = ("llama", "mistral", "mixtral", "mamba", "mamba2", "bamba", "jamba")


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    model_type: str


def hf_config(resolved) -> tuple[str, dict]:
    """The model type and config.json fields of a resolved spec, or CompileError with why no type fits."""
    types = registry()
    reasons: dict[str, list[str]] = {}
    for name in EXPORTABLE:
        result = types[name].to_hf(resolved)
        if isinstance(result, dict):
            return result["model_type"], result
        reasons[name] = result
    # Report the families whose mixer kinds match first; the rest say only that the kinds differ.
    lines = [
        f"{name}: {'; '.join(dict.fromkeys(why))}"
        for name, why in reasons.items()
        if name in ("llama", "mamba", "mamba2", "bamba")
    ]
    raise CompileError(
        [
            Diagnostic(
                "",
                "the spec is not exactly one of the model types export-spec writes ("
                + ", ".join(EXPORTABLE)
                + "):\n    "
                + "\n    ".join(lines),
                "export-spec writes only what transformers computes identically",
                SourceLocation(resolved.source_file),
            )
        ]
    )


def export_spec(
    spec: Path, output: Path, weights: Path | None = None, preset: str | None = None, overrides: tuple[str, ...] = ()
) -> ExportResult:
    from archgen.passes.cost import parameter_table
    from archgen.pipeline import compile_spec

    compiled = compile_spec(spec, preset, overrides)
    resolved = compiled.resolved
    model_type, fields = hf_config(resolved)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.exporting-", dir=output.parent))
    try:
        dtype = "float32"
        if weights is not None:
            dtype = _write_checkpoint(Path(weights), staging, registry()[model_type], parameter_table(compiled.ir), resolved)
        (staging / "config.json").write_text(json.dumps({**fields, "torch_dtype": dtype}, indent=2) + "\n", encoding="utf-8")
        replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(output, model_type)


def _write_checkpoint(weights: Path, staging: Path, model_type, expected: dict, resolved) -> str:
    saved = json.loads((weights / "config.json").read_text(encoding="utf-8")) if (weights / "config.json").exists() else {}
    if saved.get("spec_hash") != resolved.spec_hash:
        raise CompileError(
            [
                Diagnostic(
                    "--weights",
                    f"{weights} holds weights for spec {saved.get('spec_hash')}, not for this spec ({resolved.spec_hash})",
                    "pass the save_pretrained directory of the package built from this spec",
                    SourceLocation(str(weights)),
                )
            ]
        )
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(weights / "model.safetensors"), framework="pt") as archgen_weights:
        for plan in model_type.weight_plans(expected, resolved):
            tensor = archgen_weights.get_tensor(plan.target)
            rows = list(tensor) if plan.stacked else [tensor]
            for row, pieces in zip(rows, plan.rows, strict=True):
                # the pieces of one row have equal widths
                for part, piece in zip(row.chunk(len(pieces), dim=-1), pieces, strict=True):
                    tensors[piece.source] = (part.t() if piece.transpose else part).contiguous()
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    return dtypes.pop() if len(dtypes) == 1 else "float32"
