"""Batch-1 (and batch-32) decoding of generated models against the memory floor and transformers, in one GPU run.

For bench/specs/bamba_1b.yaml and specs/hymba_plus.yaml (bf16, random weights), after a 128-token prompt:
  - the ops one decode step dispatches on CUDA (archgen.benchmark.decode_step_ops: per module of the package; each
    launches at least one kernel), and the kernels it launches with their summed GPU time (torch.profiler over one
    eager step: cuBLAS's split-K reductions included), what a CUDA graph replays;
  - `generate` with its CUDA-graph decode step (the default on CUDA), with the step compiled by torch.compile and
    then recorded (compile=True, its compile time beside it), and with --eager also without a graph
    (cuda_graph=False), ms/token;
  - the floor: bytes a decode step must read (weights + the caches at that length) over the device copy bandwidth
    measured in the same run;
  - exactness: greedy tokens with the graph against the eager step, and per-step logits (bf16 and float32) of the
    graph, the compiled graph and eager decoding with a tensor position, fed the same tokens, against eager decoding
    (is a greedy difference near-tied random logits or a bug?);
  - transformers' BambaForCausalLM at the same configuration (its torch path), ms/token;
  - with --pdl-ab, programmatic dependent launch (kernels/triton_support.py, programmatic_launch) off and on in the
    same run: the batch-1 graph step re-captured for each, timed twice each (off, on, off, on), their ratio, and the
    graph's logits for the same fed tokens in both (bitwise equal: PDL changes no arithmetic);
  - with --serial-branches, the parallel blocks' branches (Hymba+'s attention ∥ Mamba) recorded side by side on two
    streams (the package's default, ops/decoding.py's branch_stream) and one after another on one, in the same run:
    the batch-1 graph step re-captured for each, timed twice each (serial, concurrent, serial, concurrent), their
    ratio, the forks each capture recorded, and the graph's logits and greedy tokens in both (bitwise equal: the same
    kernels on the same inputs);
  - on CUDA, where a replay's time goes (`graph_timeline`): per profiled replay of batch 1's graph its span, the
    kernels' summed time, the GPU's busy time (their union: the parallel branches' overlap shows as busy < sum) and
    the idle gaps between launches;
  - the GPU's clocks, throttle reasons and power from nvidia-smi before and after each batch-1 row (`gpu_state_before`,
    `gpu_state_after`): two runs of the same step that differ can be told apart by them;
  - with --without KERNEL[,KERNEL] (kernel functions of the package, e.g. apply_rope_write_kv), an A/B in the same run:
    batch 1's graph re-captured with those kernels off and on, timed twice each (off, on, off, on), the off side's
    step profile, and whether the prefill logits, the graph's logits and greedy tokens are the same both ways;
  - with --autotune, each package's decoding kernels tuned as `archgen build SPEC --autotune` tunes them
    (archgen/emit/tune.py's hooks on this GPU), at batch 1 and the lengths a decoding step runs (one row; the cache the
    graph decoder allocates), the winners pinned before the first figure (`tuning`); every run records the shape
    buckets that ran their kernel's untuned default (`untuned`).

Run on a GPU from the repository root:  python bench/decode.py --out $OUT --budget-s 150
(the bars alone, about a minute: --variants graph --no-parity, transformers included)
`--dry-run` runs every step on the CPU at toy sizes (no graphs; torch.compile with its "eager" backend, which checks
the step has no graph break without inductor's minutes of CPU compiling) to check the script; its figures mean
nothing. The JSON is rewritten after every section, so a run that is stopped keeps what it measured; a section that
would start after --budget-s records that it was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import bar_ratio, command_line, gpu_state, run_metadata  # noqa: E402 - bench/ is on sys.path when a script runs

from archgen.benchmark import (  # noqa: E402
    copy_bandwidth,
    decode_step_ops,
    generates_decoder,
    greedy_loop_ms_per_token,
    logit_parity,
    ms_per_decode_step,
    tensor_bytes,
    timed_once,
)

SPECS = {"bamba_1b": ("bench/specs/bamba_1b.yaml", None, ()), "hymba_plus": ("specs/hymba_plus.yaml", None, ())}
# --dry-run: the same specs at toy widths (Bamba has no tiny preset).
DRY_SPECS = {
    "bamba_1b": ("bench/specs/bamba_1b.yaml", None, ("model.d_model=64", "model.vocab_size=256", "mixers.ssm.n_heads=2",
                                                      "mixers.ssm.d_state=16", "mixers.attn.n_heads=4", "mixers.attn.head_dim=16",
                                                      "mixers.attn.n_kv_heads=2", "mixers.attn.rope.rotary_dim=16",
                                                      "ffns.mlp.hidden=128")),
    "hymba_plus": ("specs/hymba_plus.yaml", "tiny", ()),
}


# generate's decoding variants: the eager step recorded in a CUDA graph (the default), the torch.compile'd step recorded
# in one, and (with --eager) the eager step launched op by op.
GRAPH = {"cuda_graph": True}
VARIANTS = {"graph": GRAPH, "graph_compiled": {"cuda_graph": True, "compile": True},
            "eager": {"cuda_graph": False}}


def build(spec: str, preset: str | None, overrides: tuple[str, ...], out_root: Path):
    """(package, compiled spec)."""
    from archgen.testing import build_generated

    return build_generated(ROOT / spec, out_root, preset, overrides, source=spec)


DECODING_KERNEL_FILES = ("gemv", "decode_attention", "rmsnorm", "qkv_rope", "in_proj_conv", "state_update",
                         "causal_conv1d")
"""The kernel files with tuners that a decoding step runs (the scans' and the training kernels' tuning is minutes of
compiles that change nothing here)."""


def autotune(package, compiled, lengths: list[int], batches: tuple[int, ...]) -> dict:
    """Tune the package's decoding kernels here as `archgen build --autotune` does (each kernel file's hook at these
    batches and lengths, bf16) and pin the winners in the package's tuners; what was tuned, and how long it took."""
    from archgen.emit.tune import tune_kernels, tuning_cases, tuning_device

    started = time.perf_counter()
    cases = [case for case in tuning_cases(compiled.ir, lengths, batches) if case.file in DECODING_KERNEL_FILES]
    device = tuning_device()  # (it imports archgen's kernels)
    support = importlib.import_module("archgen_kernels.triton_support")
    candidates, tune = {}, support.Autotuner.tune

    def recording(tuner, key, launch, configs=None):  # every candidate's ms (or its error), which the table drops
        best = tune(tuner, key, launch, configs)
        candidates[f"{tuner.name} {key}"] = dict(tuner.timings.get(key, {}))
        return best

    support.Autotuner.tune = recording
    try:
        table, warnings = tune_kernels(cases, "bfloat16", device)
    finally:
        support.Autotuner.tune = tune
    applied = package.kernels.triton_support.load_tuning_table(table)
    return {"lengths": lengths, "batches": list(batches), "entries": len(table["entries"]), "applied": applied,
            "seconds": round(time.perf_counter() - started, 1), "without_hook": [w.message for w in warnings],
            "table": table["entries"], "candidates": candidates}


def step_ms_per_token(model, prompt, new_tokens: int, device: str, options: dict) -> float:
    """The decode figure of a variant: the greedy loop alone for a graph on CUDA, else the two-run difference."""
    if device == "cuda" and options.get("cuda_graph"):
        return greedy_loop_ms_per_token(model, prompt, new_tokens, compile=options.get("compile", False))
    return decode_ms_per_token(lambda p, n: model.generate(p, max_new_tokens=n, temperature=0, **options), prompt,
                               new_tokens, device)


def decode_ms_per_token(generate, prompt, new_tokens: int, device: str) -> float:
    """ms per decoding step of generate(prompt, n), prefill excluded (archgen.benchmark.ms_per_decode_step: the runs
    of new_tokens and of 2 tokens, both through the same path)."""
    generate(prompt, 4)
    generate(prompt, new_tokens)  # the first call of a batch size and length captures its graph
    return ms_per_decode_step(lambda n: generate(prompt, n), new_tokens, device)


def step_kernels(model, vocab: int, device: str, top: int = 24) -> dict:
    """The CUDA kernels one eager batch-1 decode step launches (tensor position, as the graph records it), their
    summed time, and the `top` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.empty_cache(1, 512, device=device)  # room for the meta tokens, the prompt and three steps
    with torch.no_grad():
        model(torch.randint(0, vocab, (1, 128), device=device), cache=cache)
        cache.length = torch.tensor(cache.length, device=device)
        token = torch.randint(0, vocab, (1, 1), device=device)
        for _ in range(2):  # warm: Triton compiles, cuBLAS picks its kernels
            model(token, cache=cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(token, cache=cache)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name[:90], []).append(event.device_time_total)
    busiest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {"kernels": len(kernels), "kernel_time_ms": sum(e.device_time_total for e in kernels) / 1e3,
            "top": [{"name": name, "count": len(times), "total_us": sum(times)} for name, times in busiest]}


def graph_timeline(model, prompt, new_tokens: int, replays: int = 5) -> dict:
    """Where a replayed decode step's wall time goes: the graph `generate` replays for this prompt and length, replayed
    `replays` times under torch.profiler with a synchronisation and a pause between replays, and per replay the span
    (first kernel's start to the last one's end), the kernels' summed time, the GPU's busy time (the union of their
    intervals: below the sum where the parallel branches overlap) and the idle gaps (span - busy). Two processes whose
    ms/token differ tell here whether their kernels ran slower, overlapped less or waited longer between launches."""
    from torch.profiler import ProfilerActivity, profile

    decoder = generates_decoder(model, prompt, new_tokens)  # the graph the decode figure times
    decoder.prefill(lambda cache: model(prompt, cache=cache).logits[:, -1])
    token = prompt[:, -1:]
    for _ in range(3):
        decoder(token)
    torch.cuda.synchronize()
    unprofiled = replay_walls(decoder, token)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            decoder(token)
            torch.cuda.synchronize()
            time.sleep(0.002)  # a gap no replay has inside it: where one replay's kernels end
    kernels = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    return {**replay_timeline(kernels), **unprofiled}


def steady_timeline(model, prompt, new_tokens: int, steps: int = 12) -> dict:
    """The decode figure's own regime under the profiler: `steps` greedy replays back to back (CUDAGraphDecoder.greedy,
    the host submitting ahead of the GPU), cut into steps by `steady_steps`. graph_timeline replays from an idle GPU,
    so each of its replays also pays the graph's launch (the ~10 µs before session 20's first RMSNorm, say)."""
    from torch.profiler import ProfilerActivity, profile

    decoder = generates_decoder(model, prompt, new_tokens)
    decoder.prefill(lambda cache: model(prompt, cache=cache).logits[:, -1])
    token = prompt[:, -1:]
    decoder.greedy(token, 3)  # compiled, resident, warm
    decoder.prefill(lambda cache: model(prompt, cache=cache).logits[:, -1])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.greedy(token, steps)
        torch.cuda.synchronize()
    return steady_steps(sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                               if e.device_type == torch.autograd.DeviceType.CUDA))


def steady_steps(kernels: list[tuple[float, float, str]]) -> dict:
    """steady_timeline's arithmetic: kernels (start µs, end µs, name) sorted by start, cut into steps at each step's last
    kernel, the greedy pick, so that a step runs from the previous step's pick to its own, as the timed loop sees it.
    Per step but the first and the last (not steady) its span, busy time (the union of its kernels' intervals) and idle
    time, and the kernels of the median step (start from the previous pick's end, duration, name)."""
    picks = [end for _, end, name in kernels if "greedy_pick" in name]
    if len(picks) < 4:
        return {"error": f"{len(picks)} greedy picks among {len(kernels)} kernels: no steady steps to cut"}
    rows = []
    for before, after in zip(picks[1:-2], picks[2:-1], strict=True):
        inside = [kernel for kernel in kernels if before < kernel[0] <= after]
        busy = busy_us(inside)
        rows.append({"span_us": after - before, "busy_us": busy, "idle_us": after - before - busy, "from": before,
                     "kernels": inside})
    median = sorted(rows, key=lambda row: row["span_us"])[len(rows) // 2]
    return {"steps": [{key: round(row[key], 2) for key in ("span_us", "busy_us", "idle_us")} for row in rows],
            "median_step_kernels": [[round(start - median["from"], 2), round(end - start, 2), name[:40]]
                                    for start, end, name in median["kernels"]]}


def replay_walls(decoder, token, replays: int = 20) -> dict:
    """Unprofiled: the host's time in one replay call (it returns once the graph is submitted), a replay's wall from an
    idle GPU (synchronised before and after), and the per-replay wall of `replays` back to back (the host ahead of
    the GPU, as in `generate`), in µs. A submission slower than the GPU would make the back-to-back figure host-bound."""
    host, isolated = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder(token)
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        isolated.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(replays):
        decoder(token)
    torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - start) / replays
    return {"host_replay_call_us": min(host) * 1e6, "isolated_replay_us": min(isolated) * 1e6,
            "back_to_back_replay_us": back_to_back * 1e6}


def busy_us(kernels: list[tuple[float, float, str]]) -> float:
    """The time at least one of kernels (start µs, end µs, name; sorted by start) runs: the union of their intervals,
    where parallel branches overlap."""
    busy, reach = 0.0, -math.inf
    for start, end, _ in kernels:
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy


def replay_timeline(kernels: list[tuple[float, float, str]], gap_us: float = 1000.0) -> dict:
    """graph_timeline's arithmetic: kernels (start µs, end µs, name) sorted by start, split into replays wherever the
    GPU idled more than gap_us; per replay its span, kernel sum, busy time (the union of the intervals) and idle."""
    groups: list[list] = []
    reach = -math.inf
    for kernel in kernels:
        if kernel[0] - reach > gap_us:
            groups.append([])
        groups[-1].append(kernel)
        reach = max(reach, kernel[1])
    rows = []
    for group in groups:
        busy = busy_us(group)
        span = max(end for _, end, _ in group) - group[0][0]
        rows.append({"kernels": len(group), "span_us": span, "kernel_sum_us": sum(end - start for start, end, _ in group),
                     "busy_us": busy, "idle_us": span - busy})
    by_name: dict[str, float] = {}
    for start, end, name in groups[-1] if groups else []:
        by_name[name] = by_name.get(name, 0.0) + end - start
    top = sorted(by_name.items(), key=lambda item: -item[1])[:12]
    fastest = min((g for g in groups if len(g) > 1), key=lambda g: max(end for _, end, _ in g) - g[0][0], default=[])
    # the fastest replay kernel by kernel (start from its first kernel, duration, name): its critical path, read offline
    kernels_of_fastest = [[round(start - fastest[0][0], 2), round(end - start, 2), name[:40]] for start, end, name in fastest]
    # every replay's first kernels: whether the start of the fastest one (the first profiled) is its own or every one's
    heads = [[[round(start - group[0][0], 2), round(end - start, 2), name[:40]] for start, end, name in group[:6]]
             for group in groups]
    return {"replays": rows, "last_replay_top": [{"name": name, "us": us} for name, us in top],
            "fastest_replay_kernels": kernels_of_fastest, "replay_heads": heads}


def greedy_in_graph(model):
    """generate(prompt, n): n greedy tokens through the model's CUDA-graph decoder, as decode_ms_per_token takes it."""
    return lambda prompt, n: model.generate(prompt, max_new_tokens=n, temperature=0, cuda_graph=True)


def drop_graphs(model) -> None:
    """Forget the model's captured decode graphs: a graph keeps the launches it recorded, so a side of an A/B whose
    kernels or launches differ must capture anew."""
    model.__dict__.pop("_graph_decoders", None)


def set_programmatic_launch(on: bool | None) -> list[str]:
    """Flip programmatic dependent launch in every copy of triton_support loaded (archgen_kernels' and each generated
    package's kernels/): the names of those set."""
    flipped = []
    for name, module in list(sys.modules.items()):
        if name.endswith("triton_support") and hasattr(module, "set_programmatic_launch"):
            module.set_programmatic_launch(on)
            flipped.append(name)
    return flipped


def graph_logits(model, prompt, tokens: list, device: str) -> list:
    """The decode step's logits (float32) for the fed tokens after the prompt: from a freshly captured CUDA graph on
    CUDA, the eager step on the CPU (--dry-run)."""
    max_len = prompt.size(1) + len(tokens) + (model.meta_tokens.size(0) if hasattr(model, "meta_tokens") else 0)
    if device != "cuda":
        cache = model.empty_cache(prompt.size(0), max_len)
        model(prompt, cache=cache)
        return [model(token, cache=cache).logits[:, -1].float() for token in tokens]
    decoder = model.graph_decoder(prompt.size(0), max_len, prompt.device)
    decoder.prefill(lambda cache: model(prompt, cache=cache).logits[:, -1])
    return [decoder(token).float().clone() for token in tokens]


@contextlib.contextmanager
def probe_model(spec: str):
    """A probe's subject: the spec built into a temporary folder, its Model with random bf16 weights on CUDA and a
    128-token prompt, as (package, model, prompt); the folder goes when the context ends."""
    with tempfile.TemporaryDirectory() as tmp:
        package, _ = build(spec, None, (), Path(tmp))
        with torch.device("cuda"):
            model = package.Model().to(torch.bfloat16).eval()
        yield package, model, torch.randint(0, model.lm_head.weight.size(0), (1, 128), device="cuda")


def probe_parser(doc: str, budget_s: float) -> argparse.ArgumentParser:
    """The arguments every rounds_of_modes probe takes: --out, --rounds and --budget-s (no mode-round starts after it);
    a probe adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=budget_s, help="no mode-round starts after this many seconds")
    return parser


def probe_start(args) -> tuple[float, dict]:
    """(the deadline args.budget_s from now, the JSON's header) of a probe_parser probe, its --out folder made."""
    args.out.mkdir(parents=True, exist_ok=True)
    return time.monotonic() + args.budget_s, probe_header()


def probe_header() -> dict:
    """What every probe's JSON starts with: the run's metadata and the copy bandwidth measured in it."""
    return {**run_metadata(command_line(), False), "copy_bandwidth_bytes_per_s": copy_bandwidth("cuda")}


def rounds_of_modes(model, prompt, modes: list[str], switch, rounds: int = 2, deadline: float = math.inf,
                    timeline: tuple[str, ...] = ()) -> dict:
    """Several modes of the same model in this process (the probes' A/B/C...): per round, each mode in turn switched
    on (switch(mode)), its graph captured anew and the greedy loop timed (bench/decode.py's figure); per mode its
    rounds and best, its logits for 8 fed tokens compared with the first mode's (`logits_equal_to_<first>`), and for
    the modes in `timeline` a graph_timeline. A mode that fails is recorded and skipped; switch(modes[0]) at the end."""
    vocab = model.lm_head.weight.size(0)
    g = torch.Generator().manual_seed(12)
    tokens = [torch.randint(0, vocab, (prompt.size(0), 1), generator=g).to(prompt.device) for _ in range(8)]
    out: dict = {"rounds": {mode: [] for mode in modes}, "errors": {}}
    logits: dict = {}
    try:
        for round_ in range(rounds):
            for mode in modes:
                if mode in out["errors"] or time.monotonic() > deadline:
                    continue
                switch(mode)
                drop_graphs(model)
                try:
                    if mode not in logits:
                        logits[mode] = graph_logits(model, prompt, tokens, "cuda")
                        drop_graphs(model)
                        if mode in timeline:
                            out[f"timeline_{mode}"] = graph_timeline(model, prompt, 64)
                            drop_graphs(model)
                    out["rounds"][mode].append(step_ms_per_token(model, prompt, 64, "cuda", GRAPH))
                    print(mode, round_, out["rounds"][mode][-1], flush=True)
                except Exception as error:  # noqa: BLE001 — a mode a capture refuses is a finding
                    out["errors"][mode] = f"{type(error).__name__}: {str(error)[:1500]}"
                    print(mode, out["errors"][mode], flush=True)
    finally:
        switch(modes[0])
        drop_graphs(model)
    for mode, times in out["rounds"].items():
        if times:
            out[f"{mode}_ms_per_token"] = min(times)
    if modes[0] in logits:
        out[f"logits_equal_to_{modes[0]}"] = {
            mode: all(torch.equal(a, b) for a, b in zip(logits[modes[0]], other, strict=True))
            for mode, other in logits.items()}
    return out


def alternating_ab(model, prompt, args, name: str, baseline: str, candidate: str, switch, restore,
                   after_first_capture=None) -> dict:
    """Two modes of the same model in this process: before each round switch(mode) and the graph decoders dropped, so
    each mode captures its own graph; each mode timed twice in turn (baseline, candidate, baseline, candidate: drift
    shows as a difference between a mode's two figures), the best of each kept, and `<candidate>_over_<baseline>`.
    Per mode, from its first capture: the graph's logits for the same 8 fed tokens (after_first_capture(mode, out)
    then records what that capture did) and 16 greedy tokens, compared across the modes (`logits_equal`,
    `same_greedy_tokens`: the same arithmetic gives equal bits). A mode that fails (a capture refusing what the mode
    records) is recorded and the other still measured; restore() runs at the end."""
    vocab = model.lm_head.weight.size(0)
    g = torch.Generator().manual_seed(12)
    tokens = [torch.randint(0, vocab, (prompt.size(0), 1), generator=g).to(prompt.device) for _ in range(8)]
    out: dict = {"rounds": {baseline: [], candidate: []}}
    logits: dict = {}
    greedy: dict = {}
    generate = greedy_in_graph(model)
    try:
        for mode in (baseline, candidate, baseline, candidate):
            if f"{mode}_error" in out:
                continue
            switch(mode)
            drop_graphs(model)
            try:
                if mode not in logits:
                    logits[mode] = graph_logits(model, prompt, tokens, args.device)
                    if after_first_capture is not None:
                        after_first_capture(mode, out)
                    drop_graphs(model)
                    greedy[mode] = generate(prompt, 16)
                out["rounds"][mode].append(step_ms_per_token(model, prompt, args.new_tokens, args.device, GRAPH))
            except Exception as error:  # noqa: BLE001 — e.g. a capture refusing the mode's launches or streams
                out[f"{mode}_error"] = f"{type(error).__name__}: {str(error)[:1500]}"
                print(f"{name} {mode}: {out[f'{mode}_error']}", flush=True)
    finally:
        restore()
        drop_graphs(model)
    for mode in (baseline, candidate):
        if out["rounds"][mode]:
            out[f"{mode}_ms_per_token"] = min(out["rounds"][mode])
    if f"{baseline}_ms_per_token" in out and f"{candidate}_ms_per_token" in out:
        out[f"{candidate}_over_{baseline}"] = out[f"{candidate}_ms_per_token"] / out[f"{baseline}_ms_per_token"]
    if baseline in logits and candidate in logits:
        pairs = list(zip(logits[baseline], logits[candidate], strict=True))
        out["logits_equal"] = all(torch.equal(a, b) for a, b in pairs)
        out["logits_max_abs_difference"] = max((a - b).abs().max().item() for a, b in pairs)
        out["same_greedy_tokens"] = bool(torch.equal(greedy[baseline], greedy[candidate]))
    return out


def recaptures(model, prompt, args) -> dict:
    """Is the main figure's graph (the process's first capture) slower than a later capture of the same step, and is
    that the graph or the moment? The first decoder is kept aside; the step is captured anew args.recapture times
    (each timed as the main figure is, and its replays back to back); then the first decoder is put back and timed
    again. A first decoder still slow at the end is a property of that graph (its memory, its instantiation); one as
    fast as the later captures was the moment (the process or the GPU warming up). Session 14's answer: neither; the
    graphs' replays took the same time back to back (Hymba+ 1,663-1,679 µs, Bamba-1B 850-858), and what differed was
    the old figure's jitter (the difference of two generate runs), which step_ms_per_token no longer uses."""
    first = model.__dict__.get("_graph_decoders")
    out: dict = {"captures": []}
    try:
        for _ in range(args.recapture):
            model.__dict__["_graph_decoders"] = {}
            ms = step_ms_per_token(model, prompt, args.new_tokens, args.device, GRAPH)
            out["captures"].append({"ms_per_token": ms, **timed_replays(model, prompt, args)})
    finally:
        model.__dict__["_graph_decoders"] = first if first is not None else {}
    out["first_again"] = {"ms_per_token": step_ms_per_token(model, prompt, args.new_tokens, args.device, GRAPH),
                          **timed_replays(model, prompt, args)}
    return out


def timed_replays(model, prompt, args) -> dict:
    """replay_walls of the decoder `generate` uses for this prompt and --new-tokens (on CUDA)."""
    if args.device != "cuda":
        return {}
    return replay_walls(generates_decoder(model, prompt, args.new_tokens), prompt[:, -1:])


def pdl_ab(model, prompt, args) -> dict:
    """Programmatic dependent launch off and on (alternating_ab): every triton_support copy flipped, so the graph is
    captured with (or without) the programmatic launches; `pdl_active` says whether the switch is on for this device
    at all (CUDA, sm_90+). Afterwards back to ARCHGEN_PDL's choice (off unless it is 1)."""
    flipped: list[str] = []

    def switch(mode):
        flipped[:] = set_programmatic_launch(mode == "on")

    def after_first_capture(mode, out):
        out["flipped"] = list(flipped)
        if mode == "on":
            support = sys.modules[flipped[-1]] if flipped else None
            out["pdl_active"] = bool(support and support.programmatic_launch(prompt.device))

    return alternating_ab(model, prompt, args, "pdl_ab", "off", "on", switch, lambda: set_programmatic_launch(None),
                          after_first_capture)


def branches_ab(package, model, prompt, args) -> dict:
    """The parallel blocks' branches one after another on one stream (serial) and side by side on two (concurrent:
    the package's default), by the package's ops/decoding.py CONCURRENT_BRANCHES (alternating_ab); per mode the forks
    its first capture recorded (each parallel layer's, or 0). Bit-equal logits and tokens: the same kernels on the
    same inputs."""
    decoding = importlib.import_module(f"{package.__name__}.ops.decoding")
    default, forked = decoding.CONCURRENT_BRANCHES, decoding._forked
    forks = []
    decoding._forked = lambda *streams: forks.append(1) or forked(*streams)

    def switch(mode):
        decoding.CONCURRENT_BRANCHES = mode == "concurrent"
        forks.clear()

    def after_first_capture(mode, out):
        out.setdefault("forks_per_capture", {})[mode] = len(forks)

    def restore():
        decoding.CONCURRENT_BRANCHES, decoding._forked = default, forked

    return alternating_ab(model, prompt, args, "branches_ab", "serial", "concurrent", switch, restore,
                          after_first_capture)


def cache_bytes(model, batch: int, length: int, device: str) -> int:
    return tensor_bytes(model.empty_cache(batch, length, device=device).layers)


def attempt(entry: dict, key: str, fn, args=None) -> None:
    if args is not None and time.monotonic() > args.deadline:
        entry[key + "_skipped"] = f"past --budget-s {args.budget_s}"
        return
    try:
        entry[key] = fn()
    except Exception as error:  # noqa: BLE001 — a failed part is a finding; the others still run
        frames = traceback.extract_tb(error.__traceback__)[-5:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        entry[key + "_error"] = f"{type(error).__name__}: {str(error)[:1500]} [at {where}]"
        print(f"{key}: {entry[key + '_error']}", flush=True)


def exactness(model, prompt, steps: int) -> dict:
    """Whether greedy generation gives the same tokens with and without the graph. (Until 2026-12-01 this called
    generate at its default temperature 1.0, so it compared two samples, not greedy decodes.)"""
    with_graph = model.generate(prompt, max_new_tokens=steps, temperature=0, cuda_graph=True)
    without = model.generate(prompt, max_new_tokens=steps, temperature=0, cuda_graph=False)
    return {"steps": steps, "same_tokens": bool(torch.equal(with_graph, without))}


def parity(model, prompt, row: dict, args, results: dict) -> None:
    """Greedy tokens with and without the graph, then (unless --no-parity) the per-step logits of the decoders against
    eager decoding in bf16 and float32; the compiled graph's only when graph_compiled is among the --variants."""
    with_compiled = "graph_compiled" in args.variants
    attempt(row, "exactness", lambda: exactness(model, prompt, 16), args)
    if args.no_parity:
        return
    attempt(row, "logit_parity_bf16", lambda: logit_parity(model, prompt, 16, args.device, compile=with_compiled), args)
    if not args.dry_run:  # the same in float32: rounding differences shrink ~65000-fold, a bug does not
        model.float()
        # the compiled graph too when a float32 compile (as long as the bf16 one) still fits the budget
        compiled = with_compiled and time.monotonic() + row.get("graph_compiled_compile_s", 60.0) < args.deadline
        attempt(row, "logit_parity_fp32", lambda: logit_parity(model, prompt, 16, args.device, compile=compiled), args)
        model.to(torch.bfloat16)
    save(args, results)


def bench_model(name: str, spec: str, preset: str | None, overrides: tuple[str, ...], args, results: dict, bandwidth: float,
                out_root: Path) -> None:
    device = args.device
    entry = results["models"][name] = {"spec": spec, "preset": preset, "overrides": list(overrides)}
    package, compiled = build(spec, preset, overrides, out_root)
    if args.autotune and device == "cuda":
        # the step's row, and its cache: the attention's tuning bucket is the cache's length rounded up to a power of
        # two, as the graph decoder rounds the cache it allocates
        meta = sum(op.config.count for op in compiled.ir.ops() if op.kind == "meta_tokens")
        length = args.prompt_len + args.new_tokens + meta
        attempt(entry, "tuning", lambda: autotune(package, compiled, [1, length], args.batches), args)
    with torch.device(device):
        model = package.Model().to(torch.bfloat16).eval()
    vocab = model.lm_head.weight.size(0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    entry["weight_bytes"] = weight_bytes
    attempt(entry, "step_ops", lambda: {key: value for key, value in decode_step_ops(model).items() if key != "by_op"})
    if device == "cuda":
        attempt(entry, "step_kernels", lambda: step_kernels(model, vocab, device), args)
    for batch in args.batches:
        row = entry[f"batch_{batch}"] = {}
        prompt = torch.randint(0, vocab, (batch, args.prompt_len), device=device)
        meta_tokens = model.meta_tokens.size(0) if hasattr(model, "meta_tokens") else 0
        length = args.prompt_len + args.new_tokens + meta_tokens
        state_bytes = cache_bytes(model, batch, length, device)
        row["floor_ms_per_token"] = (weight_bytes + state_bytes) / bandwidth * 1e3
        row["cache_bytes"] = state_bytes
        row["gpu_state_before"] = gpu_state()  # clocks, throttling, power: what a spread between runs may come from
        with torch.no_grad():
            if batch == 1 and args.parity_first:
                parity(model, prompt, row, args, results)
            for variant, options in VARIANTS.items():
                if variant not in args.variants:
                    continue

                def generate(p, n, options=options):
                    return model.generate(p, max_new_tokens=n, temperature=0, **options)

                if options.get("compile"):  # the first call compiles: timed on its own
                    attempt(row, f"{variant}_compile_s", lambda generate=generate, prompt=prompt: timed_once(
                        lambda: generate(prompt, 4), device), args)
                attempt(row, f"{variant}_ms_per_token", lambda options=options, prompt=prompt: step_ms_per_token(
                    model, prompt, args.new_tokens, device, options), args)
                if device == "cuda" and options.get("cuda_graph"):  # the former figure, for comparison with older runs
                    attempt(row, f"{variant}_generate_difference_ms_per_token", lambda generate=generate, prompt=prompt:
                            decode_ms_per_token(generate, prompt, args.new_tokens, device), args)
                save(args, results)
            if batch == 1 and device == "cuda" and "graph" in args.variants:
                attempt(row, "graph_timeline", lambda prompt=prompt: graph_timeline(model, prompt, args.new_tokens), args)
                save(args, results)
            if batch == 1 and args.recapture and "graph" in args.variants:
                attempt(row, "recaptures", lambda prompt=prompt: recaptures(model, prompt, args), args)
                save(args, results)
            if batch == 1 and args.pdl_ab:
                attempt(row, "pdl_ab", lambda prompt=prompt: pdl_ab(model, prompt, args), args)
                save(args, results)
            if batch == 1 and args.serial_branches:
                attempt(row, "branches_ab", lambda prompt=prompt: branches_ab(package, model, prompt, args), args)
                save(args, results)
            if batch == 1 and not args.parity_first:
                parity(model, prompt, row, args, results)
            if batch == 1 and args.without:
                attempt(row, "without", lambda prompt=prompt: without_kernels(package, model, prompt, vocab, args), args)
        row["gpu_state_after"] = gpu_state()
        for variant in VARIANTS:
            if f"{variant}_ms_per_token" in row:
                row[f"{variant}_over_floor"] = row[f"{variant}_ms_per_token"] / row["floor_ms_per_token"]
        save(args, results)
    support = getattr(package.kernels, "triton_support", None)  # None: triton did not import
    entry["untuned"] = sorted(f"{tuner} {key}" for tuner, key in (support.UNTUNED if support else {}))
    save(args, results)
    model = None  # free it before the next spec
    if device == "cuda":
        torch.cuda.empty_cache()

    if name == "bamba_1b" and not args.dry_run and not args.no_transformers:
        attempt(entry, "transformers", lambda: transformers_decode(args, bandwidth), args)


def without_kernels(package, model, prompt, vocab: int, args) -> dict:
    """The A/B of --without: the same model with those kernel functions of its package switched off (the reference
    path its template takes when `use_kernel` says no) and on, alternating_ab's off, on, off, on in this process
    (`on_over_off` below 1: the kernels help; a drift in the process shows as a side's two rounds differing). Until
    session 14 one "off" timing followed the main figure, with the old two-run figure: Hymba+ read 1.61 ms/token for
    the main figure and an impossible 1.28 with the kernel off, for steps whose kernels sum the same (that figure's
    prefill jitter: archgen.benchmark.greedy_loop_ms_per_token). Also whether the two sides compute the same
    (alternating_ab's logits and greedy tokens, and the logits of the prompt run into a cache,
    `max_abs_prefill_logit_diff`: 0 and True for a kernel that computes what its reference does in the same dtype)
    and, on CUDA, the off side's step profile."""
    asked = args.without.split(",")
    names = [name for name in asked if getattr(package.kernels, name, None) is not None]
    result = {"kernels_off": names}
    if len(names) < len(asked):  # e.g. normalized_mean_add_norm in Bamba-1B, which has no parallel layer
        result["not_in_package"] = [name for name in asked if name not in names]
    if not names:
        return result  # nothing to switch off: no second graph to time
    saved = {name: getattr(package.kernels, name) for name in names}

    def switch(mode):
        for name in names:
            setattr(package.kernels, name, saved[name] if mode == "on" else None)

    def prefill_logits():
        cache = model.empty_cache(prompt.size(0), 512, device=args.device)
        return model(prompt, cache=cache).logits.float()

    def after_first_capture(mode, out):
        prefill[mode] = prefill_logits()
        if mode == "off" and args.device == "cuda":
            out["off_step_kernels"] = step_kernels(model, vocab, args.device)

    prefill: dict = {}
    result.update(alternating_ab(model, prompt, args, "without", "off", "on", switch, lambda: switch("on"),
                                 after_first_capture))
    if len(prefill) == 2:
        result["max_abs_prefill_logit_diff"] = (prefill["on"] - prefill["off"]).abs().max().item()
    return result


def transformers_decode(args, bandwidth: float) -> dict:
    import transformers
    from transformers import BambaConfig, BambaForCausalLM

    config = BambaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=8, attn_layer_indices=[3, 7, 11, 15],
                         mamba_n_heads=64, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_expand=2,
                         mamba_chunk_size=256, mamba_d_conv=4, tie_word_embeddings=False)
    with torch.device(args.device):
        peer = BambaForCausalLM(config).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 32000, (1, args.prompt_len), device=args.device)
    ms = decode_ms_per_token(lambda p, n: peer.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                             prompt, args.new_tokens, args.device)
    return {"version": transformers.__version__, "ms_per_token": ms}


def bar_rows(results: dict) -> list[dict]:
    """Issue 12's decode bars in bench/results/bars.json's row format, from this run's figures: batch-1 ms/token
    against the HBM floor (ratio floor ÷ archgen, bar 1/2: at most twice the floor) for each decoding variant, and
    Bamba's against transformers' when it was measured (ratio transformers ÷ archgen, bar 20)."""
    rows = []

    def row(figure, archgen, reference, reference_value, bar):
        rows.append({"figure": figure, "archgen": round(archgen, 4), "unit": "ms/token", "reference": reference,
                     "reference_value": round(reference_value, 4), "ratio": bar_ratio(reference_value / archgen, bar),
                     "bar": bar, "device": results["device"], "date": results["date"], "command": results["command"]})

    for name, entry in results["models"].items():
        figures = entry.get("batch_1", {})
        for variant in VARIANTS:
            ms = figures.get(f"{variant}_ms_per_token")
            if ms is None:
                continue
            row(f"{name} batch-1 decode ({variant}), bf16", ms, "HBM floor: weight + cache bytes over the copy bandwidth",
                figures["floor_ms_per_token"], 0.5)
            peer = entry.get("transformers", {}).get("ms_per_token")
            if peer is not None:
                row(f"{name} batch-1 decode ({variant}), bf16", ms, f"transformers {entry['transformers']['version']} "
                    "BambaForCausalLM (its torch path)", peer, 20.0)
    return rows


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def save(args, results: dict) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script only")
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no section after this many seconds")
    parser.add_argument("--batches", default="1", help="comma-separated decode batch sizes (the bar is batch 1)")
    parser.add_argument("--eager", action="store_true", help="also time decoding without a CUDA graph (slow)")
    parser.add_argument("--variants", default="graph,graph_compiled",
                        help=f"comma-separated decoding variants of {', '.join(VARIANTS)} (--eager adds eager)")
    parser.add_argument("--no-parity", action="store_true",
                        help="skip the per-step logit parity (it compiles the step again, in bf16 and float32)")
    parser.add_argument("--parity-first", action="store_true",
                        help="check batch-1 exactness and logit parity before timing (so a short --budget-s answers it)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' Bamba (its own ~15 s)")
    parser.add_argument("--pdl-ab", action="store_true",
                        help="batch 1: the graph step with programmatic dependent launch off and on (re-captured), "
                             "timed twice each, and their logits compared")
    parser.add_argument("--serial-branches", action="store_true",
                        help="batch 1: the graph step with the parallel blocks' branches one after another on one "
                             "stream and side by side on two (the default), re-captured, timed twice each, their "
                             "logits and greedy tokens compared")
    parser.add_argument("--recapture", type=int, default=0,
                        help="batch 1: after the main figure, capture the graph step anew this many times (each "
                             "timed), then time the first graph again: is a first capture slower, and why")
    parser.add_argument("--autotune", action="store_true",
                        help="tune each package's kernels at the decoding step's shapes first, as `archgen build "
                             "--autotune` would on this GPU (else every kernel runs its untuned default)")
    parser.add_argument("--without", default=None,
                        help="comma-separated kernel functions of the package (e.g. apply_rope_write_kv): batch 1 is "
                             "also timed in a graph, and profiled, with them off (an A/B in one run)")
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.budget_s
    args.device = "cpu" if args.dry_run else "cuda"
    args.batches = tuple(int(b) for b in args.batches.split(","))
    args.variants = set(args.variants.split(",")) | ({"eager"} if args.eager else set())
    if args.variants - set(VARIANTS):
        parser.error(f"--variants: {', '.join(sorted(args.variants - set(VARIANTS)))} unknown; choose from {', '.join(VARIANTS)}")
    args.prompt_len, args.new_tokens = (128, 64) if not args.dry_run else (8, 4)
    if args.dry_run:  # inductor would compile each toy model for minutes on a CPU; the eager backend still traces it
        torch.compile = partial(torch.compile, backend="eager")
    results = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "torch": torch.__version__,
               "triton": triton_version(),
               "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "models": {}}
    bandwidth = copy_bandwidth(args.device)
    results["copy_bandwidth_bytes_per_s"] = bandwidth
    save(args, results)
    specs = DRY_SPECS if args.dry_run else SPECS
    with tempfile.TemporaryDirectory() as tmp:
        for name, (spec, preset, overrides) in specs.items():
            if args.only and name not in args.only.split(","):
                continue
            run = partial(bench_model, name, spec, preset, overrides, args, results, bandwidth, Path(tmp))
            attempt(results, f"{name}_run", run)
            save(args, results)
    results["bars"] = bar_rows(results)
    save(args, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
