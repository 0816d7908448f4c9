"""`archgen import hf SOURCE -o OUT [--weights]`: a Hugging Face config (and checkpoint) -> OUT/spec.yaml (and
OUT/weights/, a save_pretrained directory of the package `archgen build OUT/spec.yaml` generates).

The spec is written, then compiled with the rest of archgen (so it is checked like any hand-written spec), and the
compiled parameter table is what the checkpoint is converted to: names and shapes are checked against the generated
model's own, not against a second copy of the naming rules. Everything is written in a staging directory that
replaces OUT only when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from archgen.emit.write import replace_directory
from archgen.errors import CompileError, Diagnostic, SourceLocation
from archgen.importers.config import HFConfig
from archgen.importers.layout import layout_text
from archgen.importers.model_types import Imported, blocked, registry
from archgen.importers.weights import DTYPES, Checkpoint, check_plan, write_safetensors
from archgen.spec.models import SCHEMA_VERSION


@dataclass(frozen=True)
class ImportResult:
    spec_path: Path
    spec_hash: str
    model_type: str
    n_params: int
    weights: Path | None


def default_name(source: Path, cfg: HFConfig) -> str:
    raw = source.parent.name if source.is_file() else source.name
    name = re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_")
    if not name or not re.match(r"[a-z_]", name):
        name = f"{cfg.model_type or 'model'}_{name}".strip("_")
    return name[:63]


def read_config(source: Path) -> tuple[HFConfig, Path]:
    source = Path(source)
    path = source / "config.json" if source.is_dir() else source
    if not path.exists():
        raise CompileError(
            [
                Diagnostic(
                    "",
                    f"{path} does not exist",
                    "pass a config.json or a model directory that holds one",
                    SourceLocation(str(source)),
                )
            ]
        )
    return HFConfig.load(path), path


def spec_document(cfg: HFConfig, name: str, source: str) -> dict:
    """The spec (as plain data) that a config describes; raises CompileError naming every field it cannot map."""
    types = registry()
    model_type = cfg.model_type
    cfg.read.add("model_type")
    if model_type in blocked():
        raise CompileError(
            [
                Diagnostic(
                    "model_type",
                    f"model_type '{model_type}' cannot be imported exactly yet: {blocked()[model_type]}",
                    "extend the spec language for it (see docs/design.md, Importing)",
                    SourceLocation(cfg.file),
                )
            ]
        )
    if model_type not in types:
        raise CompileError(
            [
                Diagnostic(
                    "model_type",
                    f"unknown model_type {model_type!r}",
                    f"archgen imports: {', '.join(sorted(types))}",
                    SourceLocation(cfg.file),
                )
            ]
        )
    imported: Imported = types[model_type].to_spec(cfg)
    cfg.finish()
    n_layers = len(imported.mixer_layers)
    description = f"Imported from {source} (Hugging Face model_type {model_type}) by archgen import hf."
    init_only = cfg.init_only()
    if init_only:
        description += f" Initialisation-only fields not carried over: {', '.join(init_only)}."
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "description": description,
        "model": imported.model,
        "mixers": imported.mixers,
        **({"ffns": imported.ffns} if imported.ffns else {}),
        "layout": imported.layout
        or {
            "n_layers": n_layers,
            "mixers": layout_text(imported.mixer_layers),
            **({"ffns": layout_text(imported.ffn_layers)} if set(imported.ffn_layers) != {"none"} else {}),
        },
    }


def dump_spec(document: dict) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def flow_small(dumper, data):  # small mappings (norm, rope, expert) on one line, like the hand-written specs
        flow = len(data) <= 4 and all(not isinstance(v, (dict, list)) for v in data.values())
        return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=flow)

    Dumper.add_representer(dict, flow_small)
    return yaml.dump(document, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)


def import_hf(
    source: Path, output: Path, weights: bool = False, name: str | None = None, dtype: str | None = None
) -> ImportResult:
    from archgen.passes.cost import cost_report, parameter_table
    from archgen.pipeline import compile_spec

    source = Path(source)
    cfg, config_path = read_config(source)
    document = spec_document(cfg, name or default_name(source, cfg), config_path.as_posix())
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.importing-", dir=output.parent))
    try:
        spec_path = staging / "spec.yaml"
        spec_path.write_text(dump_spec(document), encoding="utf-8")
        compiled = compile_spec(spec_path)
        resolved = compiled.resolved
        n_params = cost_report(compiled.ir).total_params
        if weights:
            model_dir = config_path.parent
            write_weights(
                model_dir,
                staging / "weights",
                registry()[cfg.model_type],
                parameter_table(compiled.ir),
                resolved,
                declared_dtype=cfg.fields.get("torch_dtype") or cfg.fields.get("dtype"),
                dtype=dtype,
            )
        replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportResult(
        output / "spec.yaml", resolved.spec_hash, cfg.model_type, n_params, output / "weights" if weights else None
    )


def write_weights(
    model_dir: Path, target: Path, model_type, expected: dict, resolved, declared_dtype: str | None, dtype: str | None
) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise CompileError([Diagnostic("--dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")])
    checkpoint = Checkpoint.open(model_dir)
    plans = model_type.weight_plans(expected, resolved)
    tied_head = resolved.model.tie_embeddings and "lm_head.weight" in checkpoint.shapes
    embed_source = next((p.sources()[0] for p in plans if p.target == "embed.weight"), None)
    out_dtypes = check_plan(
        plans,
        expected,
        checkpoint,
        declared_dtype,
        dtype,
        lambda name: model_type.ignorable(name) or (tied_head and name == "lm_head.weight"),
    )
    if (
        tied_head
        and embed_source in checkpoint.shapes
        and not torch.equal(checkpoint.load("lm_head.weight"), checkpoint.load(embed_source))
    ):
        raise CompileError(
            [
                Diagnostic(
                    "tie_word_embeddings",
                    f"the config ties the embeddings, but the checkpoint's lm_head.weight differs from {embed_source}",
                    "set tie_word_embeddings: false in the config",
                    SourceLocation(str(model_dir)),
                )
            ]
        )
    target.mkdir(parents=True)
    write_safetensors(target / "model.safetensors", plans, expected, out_dtypes, checkpoint)
    config = {"model": resolved.name, "spec_hash": resolved.spec_hash, "spec": resolved.document}  # as save_pretrained writes it
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
