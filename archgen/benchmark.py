"""`archgen bench SPEC`: how fast a spec's generated model runs on this machine, against this machine's own floors.

Builds the spec into a temporary package, then measures, for each variant of the model:
  training step   tokens/s of forward + backward + fused AdamW at batch × seq_len, or the largest shape below it that
                  fits in memory (train_figures), and MFU: the cost model's training FLOPs (3 × forward, plus the
                  backbone passes of heads such as JEPA's) over the bf16 matmul rate measured in the same run
  prefill         tokens/s of a no-grad forward at batch × seq_len
  decode          ms/token of `generate` after a prompt, at each decode batch (prefill excluded), against its floor:
                  the bytes a decode step must read (weights + caches) over the copy bandwidth measured in the run
  peak memory     of each part
Variants: `kernels` (the package as generated: Triton kernels on CUDA, CUDA-graph decoding and training through the
package's CUDAGraphTrainStep, one recorded step replayed), `reference` (the
pure-PyTorch ops, eager decoding), `compiled` (`reference` under torch.compile), and on request `kernels_compiled`
(`kernels` under torch.compile: the kernels' custom ops stay single nodes, inductor fuses what lies between them) and
`kernels_graphed` (the same compile in mode="reduce-overhead": each layer's compiled forward and backward replayed
as CUDA graphs, so the host launches one graph per layer and pass instead of its kernels one by one). The
compiled variants measure training and prefill, with the compile time and dynamo's graph-break count; their decoding
is the uncompiled variant's (`generate(compile=True)` is bench/decode.py's), so it is not timed again. They compile
each layer (`compile_layers`), not the whole model: layers of one class share one compiled graph, so the compile takes
as long for 48 layers as for one of each kind.
A part that fails records its error; a part that would start after the deadline records `<part>_skipped`; the others
still run. Everything is plain data (`BenchResult` -> JSON); `plot` draws it. `prepare_bench` + `measure_variant` let a
script (bench/whole_model.py) order the variants of several specs under one time budget.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import inspect
import math
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

VARIANTS = ("kernels", "reference", "compiled", "kernels_compiled", "kernels_graphed")
PARTS = ("train", "prefill", "decode")
DEFAULT_VARIANTS = VARIANTS[:3]  # kernels_compiled and kernels_graphed on request: more compiles of every layer kind
# each compiles the ops of its peer: variant -> (ops, torch.compile mode)
COMPILED_VARIANTS = {"compiled": ("reference", None), "kernels_compiled": ("kernels", None),
                     "kernels_graphed": ("kernels", "reduce-overhead")}


@dataclass(frozen=True)
class BenchConfig:
    spec: Path
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    device: str = "cuda"
    dtype: str = "bfloat16"
    batch: int = 4  # training and prefill
    seq_len: int = 2048
    decode_batches: tuple[int, ...] = (1, 32)
    prompt_len: int = 128
    new_tokens: int = 64
    train_steps: int = 5  # timed, after two untimed
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    parts: tuple[str, ...] = PARTS  # what each variant measures (the compiled variants never decode)


@dataclass
class BenchResult:
    spec: str
    preset: str | None
    device: str
    torch_version: str
    date: str
    parameters: int
    active_parameters: int  # per token: a mixture of experts counts its top_k of n_experts
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    train_flops_per_token: float
    config: dict
    variants: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PreparedBench:
    """A spec built and imported, with the floors measured: what measure_variant needs for any of its variants."""

    config: BenchConfig
    package: ModuleType
    result: BenchResult
    dtype: torch.dtype
    ir: object  # the compiled spec's IR, for the cost model at another sequence length

    def train_flops_per_token(self, seq_len: int) -> float:
        if seq_len == self.config.seq_len:
            return self.result.train_flops_per_token
        from archgen.passes.cost import cost_report

        return cost_report(self.ir, seq_len=seq_len).train_flops_per_token


def prepare_bench(config: BenchConfig, directory: Path, progress: Callable[[str], None] = lambda step: None
                  ) -> PreparedBench:
    """Build config.spec into directory/<name>/, import it, and measure this device's copy bandwidth and matmul rate."""
    from archgen.emit import emit, write_package
    from archgen.passes.cost import cost_report
    from archgen.pipeline import compile_spec
    from archgen.testing import import_generated

    for chosen, known, what in ((config.variants, VARIANTS, "variants"), (config.parts, PARTS, "parts")):
        unknown = set(chosen) - set(known)
        if unknown:
            raise ValueError(f"unknown {what} {sorted(unknown)}: choose from {', '.join(known)}")
    dtype = getattr(torch, config.dtype)
    progress("building the package")
    compiled = compile_spec(config.spec, config.preset, config.overrides)
    report = cost_report(compiled.ir, seq_len=config.seq_len)
    progress("measuring the device's copy bandwidth and matmul rate")
    result = BenchResult(spec=str(config.spec), preset=config.preset, device=device_name(config.device),
                         torch_version=torch.__version__, date=datetime.date.today().isoformat(),
                         parameters=report.total_params, active_parameters=report.active_params,
                         copy_bytes_per_s=copy_bandwidth(config.device),
                         matmul_flops_per_s=matmul_rate(config.device, dtype),
                         train_flops_per_token=report.train_flops_per_token,
                         config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()})
    target = Path(directory) / compiled.resolved.name
    write_package(emit(compiled, config.spec.as_posix()).files, target)
    return PreparedBench(config, import_generated(target), result, dtype, compiled.ir)


def run_bench(config: BenchConfig, progress: Callable[[str], None] = lambda step: None) -> BenchResult:
    """Measure every variant of the spec's generated model on config.device (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_bench(config, Path(tmp), progress)
        for variant in config.variants:
            progress(f"{variant}: building the model")
            prepared.result.variants[variant] = measure_variant(prepared, variant, progress)
            free_memory(config.device)
    return prepared.result


def progress_steps(config: BenchConfig) -> int:
    """How many times run_bench reports progress: the build, the floors, and per variant its model and each part it
    measures (a decode part once per batch; the compiled variants do not decode): the length of `archgen bench`'s bar."""
    steps = 2
    for variant in config.variants:
        parts = [part for part in config.parts if not (part == "decode" and variant in COMPILED_VARIANTS)]
        steps += 1 + sum(len(config.decode_batches) if part == "decode" else 1 for part in parts)
    return steps


def measure_variant(prepared: PreparedBench, variant: str, progress: Callable[[str], None] = lambda step: None,
                    deadline: float = math.inf, train_shape: tuple[int, int] | None = None,
                    parts: tuple[str, ...] | None = None, figures: dict | None = None,
                    part_seconds: dict[str, float] | None = None) -> dict:
    """The figures of one variant. Training starts at `train_shape` (batch, seq_len), by default the config's, and
    shrinks from there until it fits. `parts` (default the config's) run in order, each written into `figures` (the
    caller's dict, so that a run stopped from outside keeps the parts already done) as it ends; a part is skipped when
    it would start after `deadline` (time.perf_counter()), or would end after it by `part_seconds`' estimate of it
    (a compile that cannot finish in time is not started)."""
    config, result = prepared.config, prepared.result
    parts = config.parts if parts is None else parts
    figures = {} if figures is None else figures
    estimates = part_seconds or {}
    model = variant_model(prepared, variant)
    vocab = model.lm_head.weight.size(0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(0, vocab, (config.batch, config.seq_len + 1), device=config.device)
    breaks_before = graph_break_count()

    if "train" in parts:
        progress(f"{variant}: training step")
        model.train()
        batch, seq_len = train_shape or (config.batch, config.seq_len)
        train_tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=config.device)
        attempt(figures, "train", config.device, lambda: train_figures(
            model, train_tokens, config, deadline, graph_step=graph_train_step(prepared, variant)), deadline,
                estimates.get("train", 0.0))
        if "train" in figures:
            add_mfu(figures["train"], prepared)
        del train_tokens
        free_memory(config.device)  # the optimizer's state

    model.eval()
    if "prefill" in parts:
        progress(f"{variant}: prefill")
        with torch.no_grad():
            attempt(figures, "prefill", config.device, lambda: throughput_figures(
                lambda: model(tokens[:, :-1]), config.batch * config.seq_len, config), deadline,
                estimates.get("prefill", 0.0))
    if variant in COMPILED_VARIANTS:
        figures["graph_breaks"] = graph_break_count() - breaks_before
        if COMPILED_VARIANTS[variant][1] == "reduce-overhead":
            figures["cuda_graph_skips"] = cuda_graph_skips()
        return figures  # generate is not compiled: its decoding is the uncompiled variant's
    for batch in config.decode_batches if "decode" in parts else ():
        progress(f"{variant}: decoding at batch {batch}")
        prompt = tokens[:1, : config.prompt_len].expand(batch, -1).contiguous()
        attempt(figures, f"decode_batch_{batch}", config.device, functools.partial(
            decode_figures, model, prompt, config, variant == "kernels", weight_bytes, result.copy_bytes_per_s), deadline,
            estimates.get("decode", 0.0))
    return figures


def measure_peer(prepared: PreparedBench, variant: str, train_shape: tuple[int, int] | None = None,
                 prefill: bool = False) -> dict:
    """One fresh model of the variant, trained at exactly train_shape (batch, seq_len; nothing shrunk) and/or its
    prefill at the config's shape: the same-run peer of a variant measured without one, such as a reference that had
    to train at a smaller shape, or a compiled variant run on its own (bench/whole_model.py's ratios of (a) to (b)
    and (c))."""
    config = prepared.config
    model = variant_model(prepared, variant)
    vocab = model.lm_head.weight.size(0)
    figures: dict = {}
    if train_shape is not None:
        model.train()
        tokens = torch.randint(0, vocab, (train_shape[0], train_shape[1] + 1), device=config.device)
        attempt(figures, "train", config.device, lambda: train_figures(
            model, tokens, config, shrink=False, graph_step=graph_train_step(prepared, variant)))
        if "train" in figures:
            add_mfu(figures["train"], prepared)
        del tokens
        free_memory(config.device)  # the optimizer's state
    if prefill:
        model.eval()
        tokens = torch.randint(0, vocab, (config.batch, config.seq_len), device=config.device)
        with torch.no_grad():
            attempt(figures, "prefill", config.device, lambda: throughput_figures(
                lambda: model(tokens), config.batch * config.seq_len, config))
    return figures


def variant_model(prepared: PreparedBench, variant: str) -> torch.nn.Module:
    """A fresh model of the package on the variant's ops (its layers compiled for the compiled variants)."""
    model_module = prepared.package.model
    ops, mode = COMPILED_VARIANTS.get(variant, (variant, None))
    if hasattr(model_module, "USE_KERNELS"):
        model_module.USE_KERNELS = ops == "kernels"
    with torch.device(prepared.config.device):
        model = prepared.package.Model().to(prepared.dtype)
    if variant in COMPILED_VARIANTS:
        compile_layers(model, mode, dynamic=False)  # each shape measured gets its own static graph
    return model


def add_mfu(train: dict, prepared: PreparedBench) -> None:
    """MFU of a training figure: the cost model's FLOPs at the shape it ran over the run's matmul rate in the
    benchmark's dtype. Where the model's own rate is above that one (a CPU without native bfloat16, whose bf16 matmul
    rate depends on the shape: 1.3 GFLOP/s at 512² on an AMD EPYC, twice that tall and skinny), the square matmul was
    no peak and the ratio no MFU: `mfu` is None and `mfu_note` says why."""
    flops_per_token = prepared.train_flops_per_token(train["seq_len"])
    mfu = train["tokens_per_s"] * flops_per_token / prepared.result.matmul_flops_per_s
    if mfu <= 1:
        train["mfu"] = mfu
    else:
        train["mfu"] = None
        train["mfu_note"] = (f"the model's matmuls ran at {mfu:.2f}x the measured square-matmul rate "
                             f"({prepared.result.matmul_flops_per_s / 1e9:.2f} GFLOP/s), which is therefore not this "
                             "device's peak for them")


def compile_layers(model: torch.nn.Module, mode: str | None = None, dynamic: bool | None = None) -> None:
    """torch.compile every layer of `model.layers` in place (regional compilation). Dynamo keys its cache on the
    forward's code and treats parameters as inputs, so the layers of one class share one compiled graph: the compile
    costs one layer of each kind, whatever the depth. The embedding, the heads, the extras and the loss stay eager.
    mode="reduce-overhead" replays each layer's forward and backward as CUDA graphs (inductor's CUDA-graph trees,
    one recording per call site in the step; `cuda_graph_skips` counts the graphs it ran without them).
    dynamic=False keeps every graph static: a second shape (the benchmark's prefill after a training step at a smaller
    shape) compiles a graph of its own instead of a dynamic-shape one (dynamo's default once a size changes)."""
    for layer in model.layers:
        layer.compile(mode=mode, dynamic=dynamic)


def cuda_graph_skips() -> int:
    """Compiled graphs inductor has run without CUDA graphs in this process (its counter; the reasons go to the
    `torch._inductor` perf-hints log: TORCH_LOGS=perf_hints)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


MIN_TRAIN_SEQ_LEN = 256  # train_figures shrinks a step that does not fit down to 1 × this, no further


def graph_train_step(prepared: PreparedBench, variant: str) -> type | None:
    """The package's CUDAGraphTrainStep where a variant trains with it: `kernels` on CUDA (the package as a user runs
    it fast, as its decoding replays CUDA graphs). The references and the compiled variants train eagerly."""
    if variant != "kernels" or prepared.config.device != "cuda":
        return None
    return getattr(prepared.package, "CUDAGraphTrainStep", None)


def train_figures(model, tokens: torch.Tensor, config: BenchConfig, deadline: float = math.inf, shrink: bool = True,
                  graph_step: type | None = None) -> dict:
    """Training-step tokens/s of forward + backward + AdamW, and how long the first step took (compiling, tuning), at
    the shape of `tokens` (batch × seq_len + 1) or, with `shrink`, the largest that fits in the device's memory: each
    time a step runs out of memory the batch halves, down to 1, then the sequence length, down to MIN_TRAIN_SEQ_LEN.
    (The references' Mamba-1 scan keeps log2(64) full-size float32 tensors per layer for the backward: Hymba+'s needs
    about 300 GiB per 2048-token sequence.) The figures name the shape that ran and those that ran out of memory.
    With `graph_step` (a package's CUDAGraphTrainStep) the timed steps are replays of one recorded step."""
    batch, seq_len = tokens.size(0), tokens.size(1) - 1
    out_of_memory = []
    while True:
        try:
            figures = train_step_figures(model, tokens[:batch, : seq_len + 1], config, graph_step)
            return {**figures, "batch": batch, "seq_len": seq_len, "out_of_memory_at": out_of_memory}
        except torch.OutOfMemoryError:
            if not shrink:
                raise
        # out of the except block: the error's frames, and the activations they hold, are gone
        out_of_memory.append(f"{batch} x {seq_len}")
        model.zero_grad(set_to_none=True)
        free_memory(config.device)
        if batch == 1 and seq_len // 2 < MIN_TRAIN_SEQ_LEN:
            raise torch.OutOfMemoryError(f"a training step does not fit at any shape tried: {', '.join(out_of_memory)}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the time budget ended before a training step fitted (out of memory at "
                               f"{', '.join(out_of_memory)})")
        batch, seq_len = (batch // 2, seq_len) if batch > 1 else (1, seq_len // 2)


def train_step_figures(model, tokens: torch.Tensor, config: BenchConfig, graph_step: type | None = None) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=config.device == "cuda")
    token_count = tokens.size(0) * (tokens.size(1) - 1)

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph trees (kernels_graphed); else nothing
        next_token_loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if graph_step is None:
        return throughput_figures(step, token_count, config)
    graphed = graph_step(model, optimizer, lambda batch: next_token_loss(model, batch))
    first_call_s = timed_once(lambda: graphed(tokens), config.device)  # the first warm-up step: compiles, tunes
    try:
        record_s = timed_once(lambda: [graphed(tokens) for _ in range(graphed.warmup_steps)], config.device)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # a step that synchronises with the host cannot be recorded: timed eagerly
        optimizer.zero_grad(set_to_none=True)
        return {**throughput_figures(step, token_count, config), "first_call_s": first_call_s,
                "cuda_graph_step": False, "cuda_graph_step_error": describe_error(error)}
    seconds = timed(lambda: graphed(tokens), config.device, config.train_steps, warmup=1)
    return {"tokens_per_s": token_count / seconds, "first_call_s": first_call_s, "warmup_and_record_s": record_s,
            "cuda_graph_step": True}


def throughput_figures(fn: Callable[[], object], tokens: int, config: BenchConfig) -> dict:
    first_call_s = timed_once(fn, config.device)
    return {"tokens_per_s": tokens / timed(fn, config.device, config.train_steps, warmup=1), "first_call_s": first_call_s}


def graph_break_count() -> int:
    """Graph breaks torch.compile has met so far in this process (dynamo's counters; 0 where they do not exist)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - every torch archgen supports has them
        return 0
    return sum(counters["graph_break"].values())


def next_token_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token (plus the model's weighted auxiliary losses), whatever the package calls it."""
    forward = model.forward if hasattr(model, "forward") else model
    if "labels" in inspect.signature(forward).parameters:
        return model(tokens, labels=tokens).loss
    return model(tokens[:, :-1], targets=tokens[:, 1:]).loss


def decode_figures(model, prompt: torch.Tensor, config: BenchConfig, graphs: bool, weight_bytes: int, bandwidth: float) -> dict:
    kwargs = {"cuda_graph": graphs} if "cuda_graph" in inspect.signature(model.generate).parameters else {}

    def generate(n: int):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, temperature=0, **kwargs)

    if kwargs.get("cuda_graph") and prompt.is_cuda and hasattr(model, "graph_decoder"):
        ms = greedy_loop_ms_per_token(model, prompt, config.new_tokens)  # its own generate records the graph first
    else:
        generate(config.new_tokens)  # warm-up: compiles
        ms = ms_per_decode_step(generate, config.new_tokens, config.device, rounds=2)
    meta = model.meta_tokens.size(0) if hasattr(model, "meta_tokens") else 0
    cache = model.empty_cache(prompt.size(0), config.prompt_len + config.new_tokens + meta)
    floor_ms = (weight_bytes + tensor_bytes(cache)) / bandwidth * 1e3
    return {"ms_per_token": ms, "floor_ms_per_token": floor_ms, "times_floor": ms / floor_ms,
            "cuda_graph": bool(kwargs.get("cuda_graph")) and prompt.is_cuda}  # generate records graphs on CUDA only


def generates_decoder(model, prompt: torch.Tensor, new_tokens: int, compile: bool = False):
    """The CUDA-graph decoder `generate(prompt, max_new_tokens=new_tokens)` decodes with (the same cache-length key:
    the meta tokens, the prompt and the new tokens), made if generate has not made it yet."""
    meta_tokens = model.meta_tokens.size(0) if hasattr(model, "meta_tokens") else 0
    return model.graph_decoder(prompt.size(0), meta_tokens + prompt.size(1) + new_tokens, prompt.device, compile=compile)


def greedy_loop_ms_per_token(model, prompt: torch.Tensor, new_tokens: int, compile: bool = False,
                             rounds: int = 5) -> float:
    """ms per token of `generate`'s greedy loop on CUDA, timed alone: the CUDA-graph decoder generate uses for this
    prompt and length (generate records it first), prefilled, then `decoder.greedy(first, new_tokens - 1)`, the
    replays back to back that generate runs after its prefill, between two synchronisations; best of `rounds`.
    Why not ms_per_decode_step's difference of two generate runs here: each run's prefill (an eager forward of the
    prompt and a cache copy) jitters by milliseconds, and the difference spreads that over the tokens (session 14, an
    H200: Bamba-1B read 0.745 to 1.004 ms a token in one process for graphs replaying in 0.850-0.858 ms)."""
    if new_tokens < 3:
        raise ValueError(f"new_tokens={new_tokens}: at least 3, so that the loop takes more than one step")
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, temperature=0, cuda_graph=True, compile=compile)
        decoder = generates_decoder(model, prompt, new_tokens, compile)
        heads_off = {"run_heads": False} if "run_heads" in inspect.signature(model.forward).parameters else {}
        best = math.inf
        for _ in range(rounds):
            logits = decoder.prefill(lambda cache: model(prompt, cache=cache, **heads_off).logits[:, -1])
            first = logits.argmax(dim=-1, keepdim=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            decoder.greedy(first, new_tokens - 1)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best / (new_tokens - 1) * 1e3


def ms_per_decode_step(generate: Callable[[int], object], new_tokens: int, device: str, rounds: int = 3) -> float:
    """Milliseconds per decoding step of generate(n) (n new tokens): (best of `rounds` runs of new_tokens − best of
    2) / (new_tokens − 2). The baseline is two tokens, not one: with one new token `generate` takes no decoding step
    and, on CUDA, not the graph path either, whose prefill (a fresh cache copied into the graph's) costs more than the
    eager one (~10 ms for Hymba+), so subtracting one token's run charged that difference to the decoding steps
    (session 13: Hymba+ 1.88 ms/token that way, 1.71 for the same graph's replays back to back)."""
    if new_tokens < 3:
        raise ValueError(f"new_tokens={new_tokens}: at least 3, so that runs of 2 and of new_tokens differ by a step")
    two = min(timed_once(lambda: generate(2), device) for _ in range(rounds))
    many = min(timed_once(lambda: generate(new_tokens), device) for _ in range(rounds))
    return (many - two) / (new_tokens - 2) * 1e3


def logit_parity(model, prompt, steps: int, device: str, compile: bool = False) -> dict:
    """Per-step logits of three decoders fed the same tokens (eager greedy's), against eager decoding with an int
    position: eager with a tensor position (the code path the graph records) and the CUDA graph (CPU: skipped), and
    with compile=True the graph of the torch.compile'd step too (`generate(compile=True)`'s decoder).

    Tells a real bug (large relative errors, argmax changes where the top two logits are far apart) from bf16
    rounding on near-tied random logits (tiny errors; changes only where the top-two margin is within rounding)."""
    batch, length = prompt.shape
    max_len = length + steps + (model.meta_tokens.size(0) if hasattr(model, "meta_tokens") else 0)

    def eager(tensor_position: bool, tokens: list | None):
        cache = model.empty_cache(batch, max_len)
        logits = [model(prompt, cache=cache).logits[:, -1].float()]
        if tensor_position:
            cache.length = torch.tensor(cache.length, device=prompt.device)
        fed = []
        for i in range(steps):
            token = tokens[i] if tokens is not None else logits[-1].argmax(-1, keepdim=True)
            fed.append(token)
            logits.append(model(token, cache=cache).logits[:, -1].float())
        return logits, fed

    def graph(tokens: list, compiled: bool = False):
        decoder = model.graph_decoder(batch, max_len, prompt.device, **({"compile": True} if compiled else {}))
        logits = [decoder.prefill(lambda cache: model(prompt, cache=cache).logits[:, -1]).float()]
        for token in tokens:
            logits.append(decoder(token).float().clone())
        return logits

    def compare(logits: list, reference: list) -> dict:
        errors, flips, flip_margins = [], 0, []
        for got, want in zip(logits, reference, strict=True):
            errors.append(((got - want).abs().amax() / want.abs().amax()).item())
            top2 = want.topk(2, dim=-1).values  # (B, 2)
            changed = got.argmax(-1) != want.argmax(-1)  # (B,)
            flips += int(changed.sum())
            flip_margins += ((top2[:, 0] - top2[:, 1]) / want.abs().amax(-1))[changed].tolist()
        return {"max_relative_error": max(errors), "relative_error_per_step": errors, "argmax_changes": flips,
                "largest_relative_margin_at_a_change": max(flip_margins, default=None)}

    with torch.no_grad():
        reference, tokens = eager(False, None)
        result = {"steps": steps, "dtype": str(next(model.parameters()).dtype),
                  "eager_tensor_position": compare(eager(True, tokens)[0], reference)}
        if device == "cuda":
            result["cuda_graph"] = compare(graph(tokens), reference)
            if compile:
                result["cuda_graph_compiled"] = compare(graph(tokens, compiled=True), reference)
    return result


# What a decode step dispatches: ops that launch a kernel on a GPU (not views, not allocations).
NOT_LAUNCHES = frozenset({"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias", "_unsafe_view",
                          "promote_types"})


class OpCounter(TorchDispatchMode):
    """Counts the ATen and custom ops dispatched while active, each against the innermost module of the generated
    package that runs it (a Linear's matmul counts for the Mamba block holding it); `owner` is that stack."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.by_module: Counter[str] = Counter()
        self.owner = ["Model"]
        self.device = next(model.parameters()).device
        package = type(model).__module__
        self.hooks = [handle for module in model.modules() if module is not model and type(module).__module__ == package
                      for handle in (module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._leave))]

    def _enter(self, module, args):
        self.owner.append(type(module).__name__)

    def _leave(self, module, args, output):
        self.owner.pop()

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()

    def record(self, op: str) -> None:
        self.by_op[op] += 1
        self.by_module[self.owner[-1]] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        on_host = isinstance(out, torch.Tensor) and out.device.type == "cpu" != self.device.type  # a wrapped number
        if not (self.inside_one_kernel or on_host or func.is_view or func._schema.name.split("::")[-1] in NOT_LAUNCHES):
            self.record(str(func))
        return out

    inside_one_kernel = False  # within a composite op that CUDA runs as one kernel (OneKernelOnCUDA): not counted


# Composite ops that decompose on the meta device (and on a CPU) but are one kernel on CUDA: SDPA picks a fused
# attention kernel, F.rms_norm torch's fused norm (aten::_fused_rms_norm, seen in the H200 profiles).
ONE_KERNEL_ON_CUDA = {F.scaled_dot_product_attention: "aten.scaled_dot_product_attention", F.rms_norm: "aten.rms_norm"}


class OneKernelOnCUDA(TorchFunctionMode):
    """Counts each call of ONE_KERNEL_ON_CUDA as the one op CUDA runs, and the ops it decomposes into as none."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        op = ONE_KERNEL_ON_CUDA.get(func)
        if op is None or self.counter.inside_one_kernel:
            return func(*args, **(kwargs or {}))
        self.counter.record(op)
        self.counter.inside_one_kernel = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.inside_one_kernel = False


def decode_step_ops(model: torch.nn.Module, batch: int = 1, context: int = 256) -> dict:
    """The ops one decode step of a generated package's `model` dispatches on its kernel path, the cache holding
    `context` positions and the position a tensor, as in a recorded CUDA graph: {"total", "by_module": {class: ops},
    "instances": {class: modules of that class}, "by_op": {op: count}}. A custom op counts once, like the one kernel
    it launches.

    On CUDA this is what the step launches (a matmul may launch two kernels). On the meta device nothing is computed,
    so a billion-parameter model is counted on any machine at its real sizes: the package's `use_kernel` then takes
    every kernel its build selected, as on a GPU (the kernels' custom ops need Triton's interpreter for that:
    TRITON_INTERPRET=1 before triton is imported, as the tests set it; ARCHGEN_TRITON_ON_CPU=1 is set here while
    counting), and composite ops whose CUDA form is one kernel (SDPA, F.rms_norm) count once, as there."""
    device = next(model.parameters()).device
    package = sys.modules[type(model).__module__]
    cache = model.empty_cache(batch, context, device=device)
    cache.length = torch.tensor(context - 1, device=device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    counter = OpCounter(model)
    with contextlib.ExitStack() as stack:
        stack.callback(counter.remove_hooks)
        if device.type == "meta":
            use_kernel, on_cpu = package.use_kernel, os.environ.get("ARCHGEN_TRITON_ON_CPU")
            package.use_kernel = lambda kernel, x: package.USE_KERNELS and kernel is not None
            os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"
            stack.callback(setattr, package, "use_kernel", use_kernel)
            stack.callback(os.environ.__setitem__ if on_cpu is not None else os.environ.pop, "ARCHGEN_TRITON_ON_CPU",
                           *((on_cpu,) if on_cpu is not None else ()))
            stack.enter_context(OneKernelOnCUDA(counter))
        with torch.no_grad(), counter:
            model(token, cache=cache)
    instances = Counter(type(module).__name__ for module in model.modules())
    return {"total": sum(counter.by_op.values()), "by_module": dict(counter.by_module.most_common()),
            "instances": {name: instances[name] for name in counter.by_module},
            "by_op": dict(counter.by_op.most_common())}


def tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if hasattr(state, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(state, name)) for name in state.__dataclass_fields__)
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


# ------------------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_once(fn: Callable[[], object], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def timed(fn: Callable[[], object], device: str, iterations: int, warmup: int = 2) -> float:
    """Median seconds of one call, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = sorted(timed_once(fn, device) for _ in range(iterations))
    return times[len(times) // 2]


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a device copy of 2 GiB (16 MiB on a CPU)."""
    elements = 2**30 if device == "cuda" else 2**23
    source = torch.empty(elements, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * source.element_size() / timed(lambda: target.copy_(source), device, 10)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of one square matmul in the benchmark's dtype (8192 on a GPU, 512 on a CPU)."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device, 10)


def attempt(figures: dict, key: str, device: str, fn: Callable[[], dict], deadline: float = math.inf,
            needs_s: float = 0.0) -> None:
    """figures[key] = fn() plus its peak memory; on failure figures[key + '_error'] says what and where; when fn would
    start after the deadline, or is estimated to take `needs_s` and would end after it, figures[key + '_skipped']
    says so and fn does not run."""
    left = deadline - time.perf_counter()
    if left < 0 or left < needs_s:
        figures[key + "_skipped"] = ("time budget spent" if left < 0 else
                                     f"time budget: {left:.0f} s left, the part takes about {needs_s:.0f} s")
        return
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        figures[key] = fn()
    except Exception as error:  # noqa: BLE001 — a failed part is a finding; the others still run
        figures[key + "_error"] = describe_error(error)
        return
    if device == "cuda":
        figures[key]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30


def describe_error(error: BaseException) -> str:
    """The error's type and message with the last frames it passed through (file:line), for a JSON record."""
    frames = traceback.extract_tb(error.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return f"{type(error).__name__}: {str(error)[:800]} [at {where}]"


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine() or "cpu"


# ------------------------------------------------------------------------------------------------------- plotting
def plot(result: BenchResult, path: Path) -> None:
    """Decode ms/token of each variant at each batch against its floor, and training/prefill tokens/s (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (decode_axis, throughput_axis) = pyplot.subplots(1, 2, figsize=(11, 4))
    plot_into(result, decode_axis, throughput_axis)
    figure.suptitle(f"{Path(result.spec).stem} on {result.device} ({result.config['dtype']})")
    figure.tight_layout()
    with contextlib.suppress(FileNotFoundError):
        path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def plot_into(result: BenchResult, decode_axis, throughput_axis) -> None:
    """plot's two panels on the given matplotlib axes (bench/whole_model.py puts several specs in one figure)."""
    batches = result.config["decode_batches"]
    width = 0.8 / (len(result.variants) + 1)
    decoded = []
    for i, (variant, figures) in enumerate(result.variants.items()):
        values = [figures.get(f"decode_batch_{b}", {}).get("ms_per_token", float("nan")) for b in batches]
        decoded += [value for value in values if math.isfinite(value)]
        decode_axis.bar([j + i * width for j in range(len(batches))], values, width, label=variant)
    floors = [next((f[f"decode_batch_{b}"]["floor_ms_per_token"] for f in result.variants.values()
                    if "floor_ms_per_token" in f.get(f"decode_batch_{b}", {})), float("nan")) for b in batches]
    decode_axis.bar([j + len(result.variants) * width for j in range(len(batches))], floors, width, label="memory floor",
                    color="grey")
    decode_axis.set_xticks([j + width * len(result.variants) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    if decoded:  # a log axis needs a value (the compiled variants do not decode)
        decode_axis.set_yscale("log")  # the floor and an eager step can be two orders of magnitude apart
    decode_axis.set_ylabel("ms / token")
    decode_axis.set_title("decoding")
    decode_axis.legend(fontsize=7)
    parts = ("train", "prefill")
    for i, (variant, figures) in enumerate(result.variants.items()):
        values = [figures.get(part, {}).get("tokens_per_s", float("nan")) for part in parts]
        throughput_axis.bar([j + i * width for j in range(len(parts))], values, width, label=variant)
        train = figures.get("train", {})
        shape = (train.get("batch", result.config["batch"]), train.get("seq_len", result.config["seq_len"]))
        if "tokens_per_s" in train and shape != (result.config["batch"], result.config["seq_len"]):
            # trained at a smaller shape (it did not fit at the configured one): say so on its bar
            throughput_axis.annotate(f"{shape[0]}×{shape[1]}", (i * width, train["tokens_per_s"]), ha="center",
                                     va="bottom", fontsize=7, rotation=90)
    throughput_axis.set_xticks([j + width * (len(result.variants) - 1) / 2 for j in range(len(parts))], list(parts))
    throughput = [figures[part]["tokens_per_s"] for figures in result.variants.values() for part in parts
                  if "tokens_per_s" in figures.get(part, {})]
    if throughput and max(throughput) > 20 * min(throughput):  # a reference can be 30x below the kernels
        throughput_axis.set_yscale("log")
    throughput_axis.set_ylabel("tokens / s")
    throughput_axis.set_title(f"batch {result.config['batch']} × {result.config['seq_len']}")
