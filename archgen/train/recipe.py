"""The training recipe: a YAML file read under the spec language's rules (pydantic, unknown keys are errors, every
problem located at file:line:col with a fix), then checked against the spec, the data and the tokenizer before any
compute.

Paths in a recipe are relative to the recipe file. `load_recipe` is the one public entry; it returns a `Recipe`
(the validated model) with the `SourceMap` that locates any later problem, or raises `CompileError` with all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from archgen.errors import CompileError, Diagnostic, SourceLocation, dotted
from archgen.spec.load import _spec_path, missing_key_fix, model_at, unknown_key_fix
from archgen.spec.yaml_source import SourceMap, load_yaml

PositiveInt = Annotated[int, Field(gt=0, le=2**40, strict=True)]
Count = Annotated[int, Field(ge=0, le=2**40, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Weight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecRef(RecipeModel):
    path: str  # the spec file, relative to the recipe
    preset: str | None = None  # comma-separated presets apply left to right, as on the command line
    set: list[str] = []  # --set overrides, "dotted.path=value"


class HoldoutSplit(RecipeModel):
    fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.05  # of the documents, chosen by seed


class DataSpec(RecipeModel):
    train: list[str] = Field(min_length=1)  # .txt (one document per file), .jsonl, .parquet, or a `datasets` save dir
    validation: list[str] | HoldoutSplit = HoldoutSplit()  # files, or a fraction of the training documents
    field: str = "text"  # the text column of JSONL / Parquet / datasets rows
    seq_len: PositiveInt = 128  # tokens per training sequence (each is read with one more token for its target)
    cache_dir: str = ".archgen-cache"  # tokenized data, keyed by tokenizer and file hashes


class BytesTokenizer(RecipeModel):
    kind: Literal["bytes"]  # UTF-8 bytes: vocabulary 256, document separator byte 0 (absent from text)


class HFTokenizer(RecipeModel):
    kind: Literal["huggingface"]
    file: str  # a `tokenizers` JSON file (tokenizer.json), e.g. from `archgen tokenizer train`
    eos: str | None = None  # the document-separator token; default: the first of <|endoftext|>, </s>, <eos>, [SEP]


class TiktokenTokenizer(RecipeModel):
    kind: Literal["tiktoken"]
    encoding: str  # a tiktoken encoding name (cl100k_base, o200k_base: needs tiktoken's cache) or a .tiktoken file


TokenizerSpec = Annotated[BytesTokenizer | HFTokenizer | TiktokenTokenizer, Field(discriminator="kind")]


class OptimizerSpec(RecipeModel):
    kind: Literal["adamw"] = "adamw"
    lr: PositiveFloat = 3e-4
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1  # on matrices only; not on norms, biases, embeddings
    fused: bool | None = None  # None: fused on CUDA, the foreach implementation elsewhere


class CosineSchedule(RecipeModel):
    kind: Literal["cosine"]
    warmup_steps: Count = 0
    min_lr_ratio: Fraction = 0.1  # the learning rate at the last step, as a fraction of optimizer.lr


class WSDSchedule(RecipeModel):
    """Warmup-stable-decay: linear warmup, a constant plateau, then a linear decay over the last decay_fraction."""

    kind: Literal["wsd"]
    warmup_steps: Count = 0
    decay_fraction: Fraction = 0.2
    min_lr_ratio: Fraction = 0.0


ScheduleSpec = Annotated[CosineSchedule | WSDSchedule, Field(discriminator="kind")]


class BatchSpec(RecipeModel):
    tokens: PositiveInt  # tokens per optimizer step, over all processes
    micro_batch: PositiveInt = 8  # sequences per forward on one process; the rest is gradient accumulation


class MomentumSchedule(RecipeModel):
    start: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.996
    end: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1.0  # reached at the last step (cosine, as I-JEPA)


class JEPAObjective(RecipeModel):
    momentum: MomentumSchedule | None = None  # None: the spec's ema_momentum at every step


class Objectives(RecipeModel):
    next_token: Weight = 1.0
    aux_losses: Weight = 1.0  # multiplies the spec's router / load-balancing / selection losses (already weighted)
    heads: dict[str, Weight] = {}  # head name -> multiplier of that head's losses (default 1)
    jepa: JEPAObjective = JEPAObjective()  # only read when the spec has a JEPA head
    titans_writes: bool = True  # write the Titans memory during training (the model learns through the writes)


class EvalSpec(RecipeModel):
    interval: PositiveInt = 100  # steps
    batches: PositiveInt = 8  # micro-batches of held-out sequences per evaluation


class CheckpointSpec(RecipeModel):
    interval: Count = 0  # steps between checkpoints; 0: only at the end (and on Ctrl-C / SIGTERM)
    keep: PositiveInt = 2  # the newest checkpoints to keep


Precision = Literal["auto", "float32", "bf16-autocast", "bf16"]  # auto: bf16-autocast on CUDA, float32 elsewhere


class DistributedSpec(RecipeModel):
    fsdp: bool = True  # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    reshard_after_forward: bool = True
    # under torchrun: processes per tensor-parallel group (1: none). The world is a (world / N) × N mesh: FSDP shards
    # over the first dimension, attention heads and MLP hidden features are split over the second.
    tensor_parallel: PositiveInt = 1
    # under torchrun: spread each MoE layer's experts over the processes, E / world each, tokens exchanged with
    # all_to_all (every process still reads its own data); not together with tensor_parallel
    expert_parallel: bool = False


class Recipe(RecipeModel):
    schema_version: Literal[1]
    spec: SpecRef
    data: DataSpec
    tokenizer: TokenizerSpec = BytesTokenizer(kind="bytes")
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = CosineSchedule(kind="cosine")
    precision: Precision = "auto"
    batch: BatchSpec
    steps: PositiveInt
    clip_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = 1.0
    gradient_checkpointing: bool = False
    compile: bool = False
    # on CUDA, one process: record the optimizer step (every micro-batch's forward and backward, clipping, the
    # optimizer) once as a CUDA graph after a few eager steps and replay it (the host launches one graph instead of
    # thousands of kernels); not with compile or torchrun; elsewhere it changes nothing
    cuda_graph: bool = False
    objectives: Objectives = Objectives()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    distributed: DistributedSpec = DistributedSpec()
    seed: Count = 0
    output: str = "runs/{name}"  # {name}: the recipe file's stem
    log_interval: PositiveInt = 10


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    source_map: SourceMap
    text: str

    def resolve(self, relative: str) -> Path:
        """A path from the recipe, relative to the recipe file."""
        path = Path(relative).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else self.path.parent / path))

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.recipe.output.replace("{name}", self.path.stem))

    def locate(self, *path: str | int) -> SourceLocation:
        return self.source_map.locate(tuple(path))

    def problem(self, path: tuple, message: str, fix: str | None = None) -> Diagnostic:
        return Diagnostic(dotted(path), message, fix, self.source_map.locate(path))


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe's structure (types, unknown keys). Checks against spec and data: `checks.py`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CompileError([Diagnostic("", f"cannot read recipe: {error}", "pass the path of a readable UTF-8 YAML recipe",
                                       SourceLocation(str(path)))]) from None
    data, source_map = load_yaml(text, str(path))
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise CompileError([Diagnostic("", f"a recipe must be a mapping of keys to values, got {got}",
                                       "start from an example in recipes/", SourceLocation(str(path), 1, 1))])
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as error:
        raise CompileError([_diagnostic(item, data, source_map) for item in error.errors()]) from None
    return LoadedRecipe(recipe, path, source_map, text)


def _field_names() -> list[str]:
    names: set[str] = set()
    for obj in globals().values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel:
            names.update(obj.model_fields)
    return sorted(names)


def _diagnostic(item: dict, data: dict, source_map: SourceMap) -> Diagnostic:
    kind = item["type"]
    path = _spec_path(tuple(item["loc"]), data, kind)
    message, value, fix = item["msg"], item.get("input"), None
    if kind == "extra_forbidden":
        key = path[-1] if path else "?"
        message = f"unknown key '{key}'"
        fix = unknown_key_fix(Recipe, tuple(item["loc"]), path, _field_names(), "archgen schema --recipe")
    elif kind == "missing":
        message = f"required key '{path[-1]}' is missing"
        fix = missing_key_fix(str(path[-1]), model_at(Recipe, tuple(item["loc"])), " (see recipes/ for examples)")
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        message = "missing 'kind'" if kind == "union_tag_not_found" else f"unknown kind {item.get('ctx', {}).get('tag')!r}"
        fix = f"set kind to one of: {item.get('ctx', {}).get('expected_tags', '')}"
    elif kind == "literal_error":
        message = f"{value!r} is not allowed"
        fix = f"use {item.get('ctx', {}).get('expected', 'one of the listed values')}"
    else:
        if value is not None and not isinstance(value, dict):
            message = f"{value!r}: {message[0].lower()}{message[1:]}"
        expected = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "a quoted string",
                    "list": "a list, e.g. [a, b]", "dict": "a mapping"}
        for prefix, what in expected.items():
            if kind.startswith(prefix):
                fix = f"write {what} here"
        if kind.startswith(("greater_than", "less_than")):
            fix = "change the value to lie in the stated range"
    return Diagnostic(dotted(path), message, fix, source_map.locate(path))
