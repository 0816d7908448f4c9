"""`archgen train RECIPE`: build the spec's package if stale, tokenize the data once, train, evaluate, checkpoint.

One optimizer step on P processes reads micro_batch × accumulation × P sequences: process r's micro-batch m of step
s is global samples s·(per step) + (m·P + r)·micro_batch …, so the data a step sees does not depend on P, and the
position in the data is the step. Evaluation runs under a forked RNG, so evaluating never changes what training
draws (router noise, JEPA masks): a run stopped at step N and resumed is the run that never stopped, bit for bit on a
CPU (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from archgen.benchmark import compile_layers
from archgen.errors import CompileError, Diagnostic, SourceLocation
from archgen.train import checkpoint as ckpt
from archgen.train.adapter import ModelAdapter
from archgen.train.checks import TrainingPlan, check_token_counts, plan_training
from archgen.train.data import ShuffledOrder, prepare_tokens
from archgen.train.distributed import (
    Processes,
    average_expert_gradients,
    clip_grad_norm,
    device_mesh,
    expert_parallel_problems,
    full_model_state,
    load_sharded,
    save_sharded,
    shard_model,
    split_tensor_parallel,
    spread_experts,
    start_processes,
    stop_processes,
    sum_partial_gradients,
    tensor_parallel_problems,
)
from archgen.train.graphed import GraphedStep, StepOutputs
from archgen.train.metrics import (
    MetricsLog,
    format_count,
    memory_gib,
    peak_flops,
    perplexity,
    plot_curves,
    truncate_metrics,
)
from archgen.train.package import build_if_stale, import_package
from archgen.train.recipe import load_recipe
from archgen.train.tokenizer import save_tokenizer


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path | None
    eval_loss: float | None
    unigram_loss: float | None
    interrupted: int | None  # the signal number that stopped the run early, if one did
    curves: Path | None


def learning_rate(schedule, base_lr: float, step: int, total: int) -> float:
    """The rate for optimizer step `step` (0-based) of `total`."""
    warmup = min(schedule.warmup_steps, total)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.kind == "cosine":
        progress = (step - warmup) / max(1, total - 1 - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return base_lr * (schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * cosine)
    decay_steps = max(1, round(total * schedule.decay_fraction))  # warmup-stable-decay
    decay_start = total - decay_steps
    if step < decay_start:
        return base_lr
    return base_lr * (1 - (1 - schedule.min_lr_ratio) * (step - decay_start + 1) / decay_steps)


class Interrupt:
    """Ctrl-C and SIGTERM ask the loop to save and stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MasterWeights:
    """bfloat16 weights in the model, float32 copies in the optimizer: gradients go up to float32 before the step,
    the updated copies come back down after it."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True)) for _, p in named]
        self.names = [n for n, _ in named]

    def named_masters(self):
        return [(n, m) for n, (_, m) in zip(self.names, self.pairs, strict=True)]

    def grads_up(self):
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def weights_down(self):
        for p, m in self.pairs:
            p.copy_(m)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().contiguous() for n, (_, m) in zip(self.names, self.pairs, strict=True)}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]):
        for n, (_, m) in zip(self.names, self.pairs, strict=True):
            m.copy_(state[n])
        self.weights_down()


def _decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay on matrices only: not on biases, norm weights, embeddings or meta tokens."""
    return p.dim() >= 2 and "embed" not in name and "meta_tokens" not in name


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def train(recipe_path: Path, resume: bool | Path = False, stop_after: int | None = None, device: str | None = None,
          console=None, show_progress: bool = True) -> TrainResult:
    processes = start_processes(device)
    try:
        return _train(recipe_path, resume, stop_after, processes, console, show_progress)
    finally:
        stop_processes(processes)


def _train(recipe_path, resume, stop_after, processes: Processes, console, show_progress) -> TrainResult:
    from rich.console import Console

    started = time.perf_counter()  # every record's elapsed_s: setup and compilation show as the time before step 1

    console = console or Console(stderr=True)
    say = console.print if processes.main else (lambda *a, **k: None)
    loaded = load_recipe(recipe_path)
    processes = processes.with_tensor_parallel(loaded.recipe.distributed.tensor_parallel)
    device_memory = torch.cuda.get_device_properties(processes.device).total_memory if processes.device.type == "cuda" else None
    plan = plan_training(loaded, processes.world_size, device_memory)
    recipe = plan.recipe
    output = loaded.output_dir
    name = plan.compiled.resolved.name

    package_dir = output / "package" / name
    if processes.main and build_if_stale(plan.compiled, plan.spec_path, package_dir):
        say(f"built {package_dir}/ from {plan.spec_path}")
    processes.barrier()
    package = import_package(package_dir)

    cache_root = loaded.resolve(recipe.data.cache_dir)
    if processes.main:
        data = prepare_tokens(plan.train_files, plan.validation, plan.tokenizer, recipe.data.field, cache_root)
    processes.barrier()
    if not processes.main:
        data = prepare_tokens(plan.train_files, plan.validation, plan.tokenizer, recipe.data.field, cache_root)
    train_seqs = data.sequences("train", recipe.data.seq_len)
    eval_seqs = data.sequences("validation", recipe.data.seq_len)
    check_token_counts(plan, train_seqs.count, eval_seqs.count)
    say(f"data: {data.manifest['tokens']['train']:,} training tokens ({train_seqs.count:,} sequences of "
        f"{recipe.data.seq_len}), {data.manifest['tokens']['validation']:,} held out; cache {cache_root / data.manifest['key']}")

    precision = recipe.precision
    if precision == "auto":
        precision = "bf16-autocast" if processes.device.type == "cuda" else "float32"
    tensor_parallel = processes.tensor_parallel > 1
    expert_parallel = processes.distributed and recipe.distributed.expert_parallel
    fsdp = processes.data_size > 1 and recipe.distributed.fsdp
    # the state is saved and loaded as torch.distributed.checkpoint shards
    sharded = fsdp or tensor_parallel or expert_parallel
    torch.manual_seed(recipe.seed)  # the same initial weights on every process and every process count
    model = package.Model()
    if precision == "bf16" and not fsdp:
        model.to(torch.bfloat16)
    model.to(processes.device)
    model.gradient_checkpointing = recipe.gradient_checkpointing
    if recipe.compile:
        # each layer, before any wrapper: layers of one class share one graph, so compiling costs one layer per kind
        # (a whole-model graph of Bamba-1B did not compile within 75 s on an H200)
        compile_layers(model)
    adapter = ModelAdapter(model, plan.head_kinds, recipe.objectives)
    wrapped = model
    mesh = device_mesh(processes) if tensor_parallel or expert_parallel else None
    if tensor_parallel:
        problems = tensor_parallel_problems(model, processes.tensor_parallel)
        if problems:
            raise CompileError([loaded.problem(("distributed", "tensor_parallel"), problem,
                                               "choose a tensor_parallel size that divides every head count and hidden "
                                               "size, or 1") for problem in problems])
        split = split_tensor_parallel(model, mesh["tensor"])
        say(f"tensor parallel: {split.modules} modules split {processes.tensor_parallel} ways, the rest replicated")
    experts = []  # names of the parameters spread over the processes
    if expert_parallel:
        problems = expert_parallel_problems(model, processes.world_size)
        if problems:
            raise CompileError([loaded.problem(("distributed", "expert_parallel"), problem,
                                               "start a number of processes that divides every expert count, or set "
                                               "expert_parallel: false") for problem in problems])
        experts = spread_experts(model, mesh["data"])
        layers = len({name.rsplit(".", 1)[0] for name in experts})
        say(f"expert parallel: {layers} MoE layers' experts spread over {processes.world_size} processes")
    if fsdp:
        shard_model(model, torch.bfloat16 if precision != "float32" else None, recipe.distributed.reshard_after_forward,
                    mesh["data"] if mesh is not None else None, {model.get_parameter(name) for name in experts})
    elif processes.distributed and not tensor_parallel:
        device_ids = [processes.device] if processes.device.type == "cuda" else None
        # DDP must not average the spread experts' gradients (each process holds different experts)
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        # broadcast_buffers off: every buffer is the same on every process (derived tables; JEPA's target, which each
        # process updates from the same averaged weights), so broadcasting them before each forward is wasted traffic
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    master = MasterWeights(list(model.named_parameters())) if precision == "bf16" and not fsdp else None
    parameters = dict(model.named_parameters())  # read after sharding: FSDP2 replaces the parameter objects
    partial_gradients = [parameters[name] for name in split.partial_gradients] if tensor_parallel else []
    expert_parameters = [parameters[name] for name in experts]
    named = master.named_masters() if master else list(model.named_parameters())
    groups = [{"params": [p for n, p in named if _decays(n, p)], "weight_decay": recipe.optimizer.weight_decay},
              {"params": [p for n, p in named if not _decays(n, p)], "weight_decay": 0.0}]
    fused = recipe.optimizer.fused if recipe.optimizer.fused is not None else processes.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=recipe.optimizer.lr, betas=recipe.optimizer.betas, eps=recipe.optimizer.eps,
                                  fused=fused or None, foreach=False if tensor_parallel or expert_parallel else None)

    def autocast():
        if precision == "bf16-autocast" and not fsdp:
            # a recorded step must cast the weights in every replay, not once into autocast's cache
            cache = not (recipe.cuda_graph and processes.device.type == "cuda")
            return torch.autocast(processes.device.type, dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()

    checkpoints = output / "checkpoints"
    metrics_path = output / "metrics.jsonl"
    step = 0
    if resume:
        source = Path(resume) if not isinstance(resume, bool) else ckpt.latest_checkpoint(checkpoints)
        if source is None or not (source / "trainer.json").exists():
            raise CompileError([Diagnostic("", f"no checkpoint to resume from in {checkpoints}",
                                           "train without --resume first, or pass --resume-from a checkpoint directory",
                                           SourceLocation(str(recipe_path)))])
        step = _load(source, package, model, optimizer, master, processes, sharded)
        if processes.main:
            truncate_metrics(metrics_path, step)
        say(f"resumed from {source} at step {step}")
    elif processes.main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    total = recipe.steps
    samples_per_step = recipe.batch.micro_batch * plan.accumulation * processes.data_size
    order = ShuffledOrder(train_seqs.count, recipe.seed)
    micro = recipe.batch.micro_batch
    eval_batches = _eval_batches(eval_seqs, recipe.eval.batches, micro, processes)
    unigram = _unigram_loss(data.train, eval_batches, plan.tokenizer.vocab_size)
    flops_per_token = _train_flops_per_token(plan)
    peak = peak_flops(processes.device)
    log = MetricsLog(metrics_path, processes.main)
    params = sum(p.numel() for p in model.parameters())
    say(f"training {name} ({format_count(params)} parameters) for {total} steps of {recipe.batch.tokens:,} tokens "
        f"({micro} × {recipe.data.seq_len} × {plan.accumulation} accumulation × {processes.world_size} process"
        f"{'es' if processes.world_size > 1 else ''}) on {processes.device}, {precision}"
        + (", FSDP" if fsdp else "") + (f", tensor parallel {processes.tensor_parallel}" if tensor_parallel else "")
        + (", expert parallel" if expert_parallel else "")
        + (", torch.compile (each layer)" if recipe.compile else ""))

    def save(at_step: int) -> Path:
        began = time.perf_counter()
        saved = _save(at_step, plan, data, package_dir, model, optimizer, master, processes, sharded, checkpoints,
                      at_step * samples_per_step)
        log.write({"step": at_step, "checkpoint": saved.name, "save_s": time.perf_counter() - began,
                   "elapsed_s": time.perf_counter() - started})
        return saved

    def train_step(batch: list[torch.Tensor], at_step: int) -> StepOutputs:
        """One optimizer step on this process's micro-batches (on the device): every forward and backward, the
        gradient clipping, the optimizer step, the master weights' copies and the adapter's after-step hook. Nothing
        in it waits for the device: the losses and the gradient norm stay tensors until a record is written, so
        it can also be recorded as a CUDA graph (graphed.py)."""
        sums: dict[str, list[torch.Tensor]] = {}
        for m, tokens in enumerate(batch):
            last = m == len(batch) - 1
            if fsdp:
                model.set_requires_gradient_sync(last)
            sync = wrapped.no_sync() if processes.distributed and not sharded and not last else contextlib.nullcontext()
            with sync, autocast():
                losses = adapter.forward(wrapped, tokens)
            with sync:
                (losses.total / plan.accumulation).backward()
            for key, value in [("loss", losses.total), ("next_token_loss", losses.next_token), *losses.aux.items()]:
                sums.setdefault(key, []).append(value.detach())
        if partial_gradients:
            sum_partial_gradients(partial_gradients, mesh["tensor"].get_group())
        if expert_parameters:
            average_expert_gradients(expert_parameters, processes.world_size)
        if master:
            master.grads_up()
        grad_norm = None
        if recipe.clip_grad_norm:
            if tensor_parallel or expert_parallel:
                grad_norm = clip_grad_norm([p for _, p in named], recipe.clip_grad_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], recipe.clip_grad_norm)
                grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master:
            master.weights_down()
        momentum = adapter.after_optimizer_step(at_step + 1, total)
        return StepOutputs(sums, grad_norm, momentum)

    graphed = GraphedStep(train_step, optimizer, processes.device) if recipe.cuda_graph else None
    if graphed is not None and graphed.cuda:
        say(f"CUDA graph: {graphed.warmup_steps} eager warm-up steps, then every step replays one recorded step")

    eval_loss = None
    last_saved = None
    window_start, window_tokens = time.perf_counter(), 0
    progress, task = _progress(console, show_progress and processes.main, total, step)
    with Interrupt() as interrupt, progress:
        while step < total and (stop_after is None or step < stop_after):
            lr = learning_rate(recipe.schedule, recipe.optimizer.lr, step, total)
            wrapped.train()
            batch = [train_seqs.get(order.indices(step * samples_per_step + (m * processes.data_size + processes.data_rank)
                                                  * micro, micro)) for m in range(plan.accumulation)]
            if graphed is not None:
                outputs = graphed(batch, lr, step)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                outputs = train_step([tokens.to(processes.device, non_blocking=True) for tokens in batch], step)
            step += 1
            window_tokens += recipe.batch.tokens

            if step % recipe.log_interval == 0 or step == total:
                if processes.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                means = _step_means(outputs.sums, plan.accumulation)  # the one wait for the device per record
                record = {"step": step, **{k: processes.mean(v) for k, v in means.items()}, "lr": lr,
                          "tokens": step * recipe.batch.tokens, "tokens_per_s": window_tokens / elapsed,
                          "memory_gib": memory_gib(processes.device), "elapsed_s": time.perf_counter() - started}
                record["flops_per_s"] = record["tokens_per_s"] * flops_per_token
                if peak:
                    record["mfu"] = record["flops_per_s"] / (peak * processes.world_size)
                if outputs.grad_norm is not None:
                    record["grad_norm"] = float(outputs.grad_norm)
                if outputs.momentum is not None:
                    record["ema_momentum"] = outputs.momentum
                log.write(record)
                _show(progress, task, step, record, say, show_progress)
                window_start, window_tokens = time.perf_counter(), 0
            if step % recipe.eval.interval == 0 or step == total:
                eval_loss = _evaluate(wrapped, adapter, eval_batches, processes, autocast)
                log.write({"step": step, "eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss),
                           "unigram_loss": unigram, "elapsed_s": time.perf_counter() - started})
                say(f"step {step}: held-out loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f} "
                    f"(unigram baseline {perplexity(unigram):.2f})")
                window_start = time.perf_counter()  # evaluation time is not training throughput
            stop = processes.any(interrupt.signal is not None)
            if (recipe.checkpoint.interval and step % recipe.checkpoint.interval == 0) or stop:
                last_saved = save(step)
            if stop:
                name = signal.Signals(interrupt.signal or signal.SIGTERM).name
                say(f"interrupted by {name} at step {step}: saved {last_saved}")
                break
        if last_saved is None or not last_saved.name.endswith(ckpt.checkpoint_name(step)):
            last_saved = save(step)
    curves = plot_curves(metrics_path, output / "curves.png") if processes.main else None
    return TrainResult(output, step, last_saved, eval_loss, unigram, interrupt.signal, curves)


# ------------------------------------------------------------------------------------------------------ pieces
def _step_means(sums: dict[str, list[torch.Tensor]], accumulation: int) -> dict[str, float]:
    """Each logged loss's mean over a step's micro-batches, as floats: one transfer for all of them, then the same
    sums in the same order as float arithmetic on each micro-batch's value (so the logged numbers are the ones a
    per-micro-batch .item() gave)."""
    values = iter(torch.stack([v.float() for vs in sums.values() for v in vs]).tolist())
    means = {}
    for key, vs in sums.items():
        total = 0.0
        for _ in vs:
            total = total + next(values) / accumulation
        means[key] = total
    return means


def _train_flops_per_token(plan: TrainingPlan) -> float:
    from archgen.passes.cost import cost_report

    return cost_report(plan.compiled.ir, seq_len=plan.recipe.data.seq_len).train_flops_per_token


def _eval_batches(eval_seqs, batches: int, micro: int, processes: Processes) -> list[torch.Tensor]:
    """The first held-out sequences in order (the same every evaluation), this process's share of them."""
    wanted = min(eval_seqs.count, batches * micro * processes.data_size)
    per_process = wanted // processes.data_size
    mine = list(range(processes.data_rank * per_process, (processes.data_rank + 1) * per_process))
    return [eval_seqs.get(mine[i : i + micro]) for i in range(0, len(mine), micro)]


def _unigram_loss(train_tokens: np.ndarray, eval_batches: list[torch.Tensor], vocab: int) -> float:
    """Cross-entropy of the held-out targets under the training data's token frequencies (add-one smoothed): the
    loss of a model that ignores context, which a trained model has to beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab).astype(np.float64) + 1
    log_p = np.log(counts / counts.sum())
    targets = np.concatenate([b[:, 1:].reshape(-1).numpy() for b in eval_batches])
    return float(-log_p[targets].mean())


@torch.no_grad()
def _evaluate(wrapped, adapter, eval_batches, processes: Processes, autocast) -> float:
    """The mean next-token loss over the held-out batches, eagerly: compiled layers would compile again for eval
    mode without gradients, which costs more than the few batches of an evaluation save."""
    wrapped.eval()
    devices = [processes.device] if processes.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
        losses = []
        for tokens in eval_batches:
            with autocast():
                losses.append(adapter.forward(wrapped, tokens.to(processes.device)).next_token.float().item())
    wrapped.train()
    return processes.mean(sum(losses) / len(losses))


def _progress(console, enabled: bool, total: int, start: int):
    if not enabled:
        return contextlib.nullcontext(), None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[status]}"), console=console, transient=False)
    task = progress.add_task("train", total=total, completed=start, status="")
    return progress, task


def _show(progress, task, step, record, say, show_progress):
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"{format_count(record['tokens_per_s'])} tok/s"]
    parts.append(f"MFU {record['mfu']:.1%}" if "mfu" in record else f"{format_count(record['flops_per_s'])}FLOP/s")
    parts.append(f"{record['memory_gib']:.2f} GiB")
    status = "  ".join(parts)
    if task is not None:
        progress.update(task, completed=step, status=status)
    if not show_progress or task is None or not progress.console.is_terminal:
        say(f"step {step}: {status}")


def _save(step, plan, data, package_dir, model, optimizer, master, processes: Processes, fsdp, root: Path, samples) -> Path:
    import torch.distributed as dist
    from safetensors.torch import save_file

    staging = [ckpt.staging_directory(root, step) if processes.main else None]
    if processes.distributed:
        dist.broadcast_object_list(staging, src=0)
    staging = staging[0]
    if fsdp:
        save_sharded(model, optimizer, staging)
        full = full_model_state(model)
        if processes.main:
            save_file(full, str(staging / "model.safetensors"), metadata={"format": "pt"})
            resolved = plan.compiled.resolved  # as save_pretrained writes it: the checkpoint says what model it is
            (staging / "config.json").write_text(json.dumps({"model": resolved.name, "spec_hash": resolved.spec_hash,
                                                             "spec": resolved.document}, indent=2) + "\n")
    elif processes.main:
        model.save_pretrained(staging)
        ckpt.save_optimizer(optimizer, staging)
        if master:
            save_file(master.state(), str(staging / "master.safetensors"))
    ckpt.save_rng(staging, f"rng.rank{processes.rank}.safetensors")
    processes.barrier()
    target = None
    if processes.main:
        recipe_text = plan.loaded.text
        trainer = {"step": step, "samples": samples, "total_steps": plan.recipe.steps, "world_size": processes.world_size,
                   "schedule": plan.recipe.schedule.model_dump(), "format": 1, "sharded": fsdp,
                   "tensor_parallel": processes.tensor_parallel}
        (staging / "trainer.json.tmp").write_text(json.dumps(trainer, indent=2) + "\n")
        (staging / "recipe.yaml").write_text(recipe_text)
        (staging / "spec.lock.yaml").write_bytes((package_dir / "spec.lock.yaml").read_bytes())
        manifest = {"spec": {"file": str(plan.spec_path), "preset": plan.recipe.spec.preset, "set": plan.recipe.spec.set,
                             "hash": plan.compiled.resolved.spec_hash},
                    "recipe": {"file": str(plan.loaded.path), "sha256": hashlib.sha256(recipe_text.encode()).hexdigest()},
                    "data": data.manifest, "tokens_trained": step * plan.recipe.batch.tokens, "git_commit": _git_commit(),
                    "torch": torch.__version__, "world_size": processes.world_size}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        save_tokenizer(plan.tokenizer, staging)
        ckpt.copy_package(package_dir, staging)
        (staging / "trainer.json.tmp").rename(staging / "trainer.json")  # last: a checkpoint is one with trainer.json
        target = ckpt.publish(staging, root, step, plan.recipe.checkpoint.keep)
    processes.barrier()
    return target or root / ckpt.checkpoint_name(step)


def _load(source: Path, package, model, optimizer, master, processes: Processes, fsdp) -> int:
    from safetensors.torch import load_file, load_model

    saved = json.loads((source / "config.json").read_text())
    if saved.get("spec_hash") != package.SPEC_HASH:
        raise CompileError([Diagnostic("spec", f"{source} holds weights for spec {saved.get('spec_hash')}, but the recipe's "
                                       f"spec is now {package.SPEC_HASH}", "resume with the spec the run started with, or "
                                       "start a new run (another output directory)", SourceLocation(str(source)))])
    trainer = json.loads((source / "trainer.json").read_text())
    if (source / "distributed").exists():
        load_sharded(model, optimizer, source)
        if master:
            master.load({n: p.detach().float() for n, p in model.named_parameters()})
    elif fsdp:
        raise CompileError([Diagnostic("", f"{source} was written by one process; resuming it sharded is not supported yet",
                                       "resume it without torchrun, or start the sharded run afresh",
                                       SourceLocation(str(source)))])
    else:
        load_model(model, str(source / "model.safetensors"), strict=True, device=str(processes.device))
        ckpt.load_optimizer(optimizer, source)
        if master:
            master.load(load_file(str(source / "master.safetensors"), device=str(processes.device)))
    ckpt.load_rng(source, f"rng.rank{processes.rank}.safetensors")
    return int(trainer["step"])
