"""Check a recipe against its spec, its data, its tokenizer and the processes it runs on, before any compute.

Every problem is a located Diagnostic (the recipe's file:line:col, the dotted recipe path, a fix); all of them are
raised together. What passes becomes a `TrainingPlan`: every number the loop needs, decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from archgen.errors import CompileError, Diagnostic
from archgen.pipeline import Compiled, compile_spec
from archgen.train.data import check_source
from archgen.train.recipe import LoadedRecipe
from archgen.train.tokenizer import TokenizerError, make_tokenizer


@dataclass(frozen=True)
class TrainingPlan:
    loaded: LoadedRecipe
    compiled: Compiled
    spec_path: Path
    tokenizer: object
    train_files: list[Path]
    validation: list[Path] | float
    world_size: int
    accumulation: int  # micro-batches per optimizer step on each process
    head_kinds: dict[str, str]
    meta_tokens: int

    @property
    def recipe(self):
        return self.loaded.recipe


def plan_training(loaded: LoadedRecipe, world_size: int = 1, device_memory: int | None = None) -> TrainingPlan:
    """`device_memory`: bytes of one accelerator, when training on one; the recipe must fit it (see memory_floor)."""
    recipe = loaded.recipe
    problems: list[Diagnostic] = []

    spec_path = loaded.resolve(recipe.spec.path)
    compiled = None
    if not spec_path.exists():
        problems.append(loaded.problem(("spec", "path"), f"spec file {spec_path} does not exist",
                                       "give the spec's path relative to this recipe, e.g. ../specs/hspmn.yaml"))
    else:
        try:
            compiled = compile_spec(spec_path, recipe.spec.preset, recipe.spec.set)
        except CompileError as error:  # the spec's own located errors, plus where the recipe names it
            problems += error.diagnostics
            problems.append(loaded.problem(("spec",), "the spec this recipe trains has errors (above)",
                                           "fix the spec, or the preset / set overrides named here"))

    train_files = [loaded.resolve(p) for p in recipe.data.train]
    validation = ([loaded.resolve(p) for p in recipe.data.validation] if isinstance(recipe.data.validation, list)
                  else recipe.data.validation.fraction)
    named = [(("data", "train", i), p) for i, p in enumerate(train_files)]
    if isinstance(validation, list):
        named += [(("data", "validation", i), p) for i, p in enumerate(validation)]
    for where, path in named:
        why = check_source(path, recipe.data.field)
        if why is not None:
            fix = ("give an existing .txt, .jsonl, .parquet file or a `datasets` save_to_disk directory, relative to "
                   "this recipe") if "exist" in why else "set data.field to the text column, or give another file"
            problems.append(loaded.problem(where, f"{path}: {why}", fix))

    tokenizer = None
    try:
        tokenizer = make_tokenizer(recipe.tokenizer, loaded.resolve)
    except TokenizerError as error:
        problems.append(loaded.problem(("tokenizer",), str(error), "fix the tokenizer file or name, or use {kind: bytes}"))

    head_kinds: dict[str, str] = {}
    meta_tokens = 0
    if compiled is not None:
        spec = compiled.loaded.spec  # the validated spec with presets and overrides applied
        vocab = spec.model.vocab_size
        head_kinds = {name: head.kind for name, head in spec.heads.items()}
        meta_tokens = spec.meta_tokens.count if spec.meta_tokens else 0
        if tokenizer is not None and tokenizer.vocab_size != vocab:
            problems.append(loaded.problem(("tokenizer",), f"the tokenizer has {tokenizer.vocab_size:,} tokens but the spec's "
                                           f"vocabulary is {vocab:,}",
                                           f"use a tokenizer of {vocab:,} tokens, or set the spec's model.vocab_size to "
                                           f"{tokenizer.vocab_size} (spec.set: [model.vocab_size={tokenizer.vocab_size}])"))
        room = spec.model.max_seq_len - meta_tokens
        if recipe.data.seq_len > room:
            problems.append(loaded.problem(("data", "seq_len"), f"sequences of {recipe.data.seq_len} tokens do not fit the "
                                           f"model's max_seq_len {spec.model.max_seq_len}"
                                           + (f" less its {meta_tokens} meta tokens" if meta_tokens else ""),
                                           f"use seq_len ≤ {room}, or raise the spec's model.max_seq_len"))
        for name in recipe.objectives.heads:
            if name not in head_kinds:
                known = ", ".join(head_kinds) or "none"
                problems.append(loaded.problem(("objectives", "heads", name),
                                               f"the spec has no head '{name}' (its heads: {known})",
                                               "name one of the spec's heads, or remove this weight"))
        if recipe.objectives.jepa.momentum is not None and "jepa" not in head_kinds.values():
            problems.append(loaded.problem(("objectives", "jepa"), "a JEPA momentum schedule, but the spec has no JEPA head",
                                           "remove objectives.jepa"))

    if compiled is not None and device_memory is not None:
        need = memory_floor(compiled, recipe, world_size)
        if need > device_memory:
            problems.append(loaded.problem(("batch", "micro_batch"), f"training needs at least {need / 2**30:.1f} GiB per device "
                                           f"(weights, gradients and AdamW state at 16 bytes per parameter"
                                           f"{' over ' + str(world_size) + ' shards' if world_size > 1 else ''}, plus the "
                                           f"residual stream of every layer for micro-batch {recipe.batch.micro_batch} × "
                                           f"{recipe.data.seq_len}); the device has {device_memory / 2**30:.1f} GiB",
                                           "lower micro_batch (batch.tokens stays: accumulation grows), turn on "
                                           "gradient_checkpointing, or train on more GPUs"))
    tensor_parallel = recipe.distributed.tensor_parallel if world_size > 1 else 1
    if tensor_parallel > 1 and world_size % tensor_parallel:
        problems.append(loaded.problem(("distributed", "tensor_parallel"), f"{world_size} processes do not split into "
                                       f"tensor-parallel groups of {tensor_parallel}",
                                       f"start a multiple of {tensor_parallel} processes, or change tensor_parallel"))
        tensor_parallel = 1
    if tensor_parallel > 1 and recipe.distributed.expert_parallel:
        problems.append(loaded.problem(("distributed", "expert_parallel"), "expert parallelism together with tensor "
                                       "parallelism is not supported (the experts spread over every process)",
                                       "set tensor_parallel: 1, or expert_parallel: false"))
    if tensor_parallel > 1 and world_size > tensor_parallel and not recipe.distributed.fsdp:
        problems.append(loaded.problem(("distributed", "fsdp"), "tensor parallelism across several data-parallel groups "
                                       "needs FSDP (replicated DDP over split modules is not supported)",
                                       "set distributed.fsdp: true, or run exactly tensor_parallel processes"))
    if recipe.cuda_graph:
        problems += _cuda_graph_problems(loaded, world_size, head_kinds)
    data_parallel = world_size // tensor_parallel  # processes of one tensor group read the same micro-batch
    per_step = recipe.data.seq_len * recipe.batch.micro_batch * data_parallel
    if recipe.batch.tokens % per_step:
        lower = max(per_step, recipe.batch.tokens // per_step * per_step)
        problems.append(loaded.problem(("batch", "tokens"), f"{recipe.batch.tokens:,} tokens per step is not a multiple of "
                                       f"seq_len {recipe.data.seq_len} × micro_batch {recipe.batch.micro_batch} × "
                                       f"{data_parallel} data-parallel process{'es' if data_parallel > 1 else ''} = {per_step:,}",
                                       f"use {lower:,} or {lower + per_step:,}, or change micro_batch"))
    if problems:
        raise CompileError(problems)
    return TrainingPlan(loaded, compiled, spec_path, tokenizer, train_files, validation, world_size,
                        recipe.batch.tokens // per_step, head_kinds, meta_tokens)


def _cuda_graph_problems(loaded: LoadedRecipe, world_size: int, head_kinds: dict[str, str]) -> list[Diagnostic]:
    """What a recorded step (train/graphed.py) cannot do."""
    recipe, problems = loaded.recipe, []
    if world_size > 1:
        problems.append(loaded.problem(("cuda_graph",), f"a CUDA-graph step records one process's step, but this run has "
                                       f"{world_size} processes (torchrun): the gradients' collectives are not recorded",
                                       "set cuda_graph: false, or train on one process without torchrun"))
    if recipe.compile:
        problems.append(loaded.problem(("cuda_graph",), "cuda_graph together with compile: true is not supported "
                                       "(recording compiled layers' guards and recompilations in one step graph)",
                                       "choose one: set compile: false, or cuda_graph: false"))
    if recipe.objectives.jepa.momentum is not None and "jepa" in head_kinds.values():
        problems.append(loaded.problem(("objectives", "jepa", "momentum"), "a JEPA momentum schedule changes every step, "
                                       "but a CUDA-graph step replays the momentum it recorded",
                                       "remove objectives.jepa.momentum (the spec's constant ema_momentum), or set "
                                       "cuda_graph: false"))
    return problems


def memory_floor(compiled: Compiled, recipe, world_size: int) -> int:
    """A lower bound on one device's training memory: float32 weights, gradients and AdamW's two moments (16 bytes
    per parameter, sharded over the processes under FSDP), plus the one activation autograd keeps per layer at the
    least, the layer's input (B, T, d_model), in the compute dtype. Real use is higher; above this, nothing fits."""
    from archgen.passes.cost import cost_report

    params = cost_report(compiled.ir, seq_len=recipe.data.seq_len).total_params
    shards = world_size if recipe.distributed.fsdp else 1
    activation_bytes = 4 if recipe.precision == "float32" else 2
    dims = compiled.resolved.model
    residual = compiled.resolved.n_layers * recipe.batch.micro_batch * recipe.data.seq_len * dims.d_model * activation_bytes
    return 16 * params // shards + residual


def check_token_counts(plan: TrainingPlan, train_sequences: int, validation_sequences: int) -> None:
    """After tokenizing (before training): both splits must hold at least one full sequence per process."""
    loaded, problems = plan.loaded, []
    need = plan.world_size
    seq_len = plan.recipe.data.seq_len
    if train_sequences < need * plan.recipe.batch.micro_batch:
        problems.append(loaded.problem(("data", "train"), f"the training data gives {train_sequences} sequences of "
                                       f"{seq_len + 1} tokens, fewer than one micro-batch per process",
                                       "add data, or lower data.seq_len or batch.micro_batch"))
    if validation_sequences < need:
        problems.append(loaded.problem(("data", "validation"), f"the validation data gives {validation_sequences} sequences "
                                       f"of {seq_len + 1} tokens ({need} needed: one per process)",
                                       "hold out a larger fraction, give validation files, or lower data.seq_len"))
    if problems:
        raise CompileError(problems)
