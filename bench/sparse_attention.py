"""HSPMN sparse-query attention (kernels/packed_query_attention.py) on one GPU, in one run: numerics first, then
timings against peers measured in the same run.

Sections (each in its own try/except; results and errors go to one JSON file, rewritten after every section):
  numerics  bf16 at the timing shape against packed_query_attention_reference in float32 on the same values,
            relative norm 1e-2, output and dq, dk, dv (its first calls autotune the three kernels)
  sparse    B 8, 16 heads x 128, L 4096, bf16, Bernoulli(0.2) selection per token: the kernel on the packed queries
            (what the generated HSPMN block runs: it projects only the selected tokens), forward and forward+backward;
            end to end from a full-length q to the full-length output: sparse_query_attention, which reads the
            selected rows in place and writes every row (zeros where not selected), with no host sync; for context
            the old way, packing (one host sync for the count), gather and scatter around the packed kernel; the
            backward kernels alone (kernel_backward_alone_ms); ops/routing.py's packed path (chunked SDPA
            with masks, what runs without the kernel) for context; against causal SDPA over ALL queries at the same
            shape (default backend, flash, cuDNN: the fastest is the peer). Bar: >= 3x faster.
  window    sliding window 1024, B 4, 32 q / 8 kv heads, L 4096, D 128, bf16: the same kernel with every token as a
            query (positions 0..L-1, window 1024; its own tuning) against torch.compile(flex_attention) with a
            sliding-window block mask (issue 11's bar: no slower) and against ops/attention.py's banded SDPA (what an
            attention layer with a window runs without the kernel); numerics of the kernel and flex
  edges     bf16 numerics at a ragged shape (odd lengths, grouped heads, padding rows, a window, keys past every
            query), on the configs `numerics` tuned
  ncu       (with --ncu after the others, or alone with --only ncu) Nsight Compute on the backward kernels
            (bench/ncu.py), each launched once in a child process under ncu: dq and dk/dv on their first configs
            (the fastest measured so far) at the `sparse` shape, then at the `window` one. Per launch in the JSON:
            time, occupancy, registers, issue activity and the stall reasons; ncu's tables in ncu/backward.ncu.txt

Forward and forward + backward are timed twice: eager calls queued back to back, and replays of a CUDA graph of the
same calls (the GPU's time without the host's: see Bench.graphed_ms); the bars take the replays where ours and the
peer have them, ours and the peers' alike, and say so ("CUDA graph").

`sparse` and `window` also record a breakdown: the GPU kernels of a few back-to-back forward + backward calls
(torch.profiler), each kernel's microseconds per call, their sum (busy_us) and the span from the first kernel's
start to the last one's end (span_us): span - busy is the GPU idle between kernels.

A section that would not finish inside --budget-s is skipped (recorded as such); run it alone with --only.
tuner_ms_per_config in the JSON is the time of each kernel alone (forward, backward_dq with delta, backward_dkdv) under
every candidate config, per shape bucket (G1-causal: `sparse`; G4-window: `window`): the per-kernel breakdown.

Outputs under --out (default $OUT, else bench/results): sparse_attention.json (everything) and
sparse_attention.bars.json (bar rows in bench/results/bars.json's format, to append there).

Run from the repository root on the GPU machine (needs only torch and triton; ~100 s, mostly Triton compiles and
autotuning):
    python bench/sparse_attention.py --out $OUT --budget-s 110
The bars alone, each kernel on its first config (no tuning compiles), in about half the time:
    python bench/sparse_attention.py --only sparse,window --bars-only --untuned --out $OUT
or on the configs an earlier run tuned, per shape bucket (its JSON's tuned_configs; nothing tunes, the rest untuned):
    python bench/sparse_attention.py --only sparse,window --bars-only --pin bench/results/RUN.json --out $OUT
On a CPU, tiny shapes in Triton's interpreter, timings meaningless (exercises every code path):
    python bench/sparse_attention.py --dry-run --out /tmp/sparse_attention
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import ncu  # bench/ncu.py, beside this script
from harness import bar_ratio  # noqa: E402 - bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("numerics", "sparse", "window", "edges")
NCU_NEEDS_S = 50  # the ncu section: a child process (torch, eight kernel compiles), ncu replaying four launches
FULL = {"sparse": {"B": 8, "H": 16, "T": 4096, "D": 128}, "fraction": 0.2,
        "window_shape": {"B": 4, "Hq": 32, "Hkv": 8, "T": 4096, "D": 128}, "window": 1024, "reps": 10}
TINY = {"sparse": {"B": 2, "H": 2, "T": 64, "D": 16}, "fraction": 0.2,
        "window_shape": {"B": 1, "Hq": 2, "Hkv": 1, "T": 48, "D": 16}, "window": 20, "reps": 1}
EDGE_CASES = [(3, 4, 2, 301, 330, 0.3, 37)]  # (B, H, Hkv, T, Tk, fraction, window) at the timing head dim: one case,
# one set of compiles (odd lengths, grouped heads, padding rows, a window, keys past every query)
TINY_EDGE_CASES = [(2, 2, 1, 37, 41, 0.3, 9)]


def rel_norm(actual, expected) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def load_module(name: str, relative_path: str):
    """Import a file by path (templates/runtime files are not a package on the GPU machine's path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Bench:
    def __init__(self, out: Path, dry_run: bool, budget_s: float, only: set[str], bars_only: bool = False):
        import torch

        sys.path.insert(0, str(ROOT))
        from archgen.resources import kernels_package

        kernels_package()  # the repository's kernels/ folder, as the package archgen_kernels
        from archgen_kernels import packed_query_attention as pqa

        self.torch, self.pqa = torch, pqa
        self.routing = load_module("sparse_bench_routing", "templates/runtime/routing.py")
        self.out, self.dry_run, self.budget_s, self.only = out, dry_run, budget_s, only
        self.bars_only = bars_only  # the bars' figures and their peers only: no context variants, breakdowns
        self.device = "cpu" if dry_run else "cuda"
        self.s = TINY if dry_run else FULL
        self.started = time.perf_counter()
        self.results: dict = {"meta": self.meta(), "sections": {}}
        self.bars: list[dict] = []
        self.command = "python bench/sparse_attention.py " + " ".join(sys.argv[1:])

    def meta(self) -> dict:
        import triton

        torch = self.torch
        meta = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                "dry_run": self.dry_run, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name()
        return meta

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["tuned_configs"] = self.pqa.tuned_configs()
        self.results["tuner_ms_per_config"] = self.pqa.tuning_times()  # each kernel alone: the per-kernel breakdown
        (self.out / "sparse_attention.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "sparse_attention.bars.json").write_text(json.dumps(self.bars, indent=2) + "\n")

    def section(self, name: str, fn, needs_s: float) -> None:
        if self.only and name not in self.only:
            return
        if self.elapsed() + needs_s > self.budget_s:
            self.results["sections"][name] = {"skipped": f"budget: {self.elapsed():.0f}s used, needs ~{needs_s}s"}
            self.write()
            return
        t0 = time.perf_counter()
        record: dict = {}
        self.results["sections"][name] = record
        try:
            fn(record)
        except Exception as error:  # noqa: BLE001 - a failing section is recorded, never fatal
            record["error"] = f"{type(error).__name__}: {error}"[:2000]
            record["traceback"] = traceback.format_exc()[-4000:]
        finally:
            record["seconds"] = round(time.perf_counter() - t0, 1)
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
            self.write()
            print(f"[{self.elapsed():6.1f}s] {name}: {'ERROR ' + record['error'][:300] if 'error' in record else 'ok'}",
                  flush=True)

    def bar(self, figure: str, archgen: float, reference: str, reference_value: float, bar: float) -> None:
        """A time figure: ratio = reference / archgen (above 1: archgen faster)."""
        self.bars.append({
            "figure": figure, "archgen": round(archgen, 4), "unit": "ms", "reference": reference,
            "reference_value": round(reference_value, 4), "ratio": bar_ratio(reference_value / archgen, bar), "bar": bar,
            "device": self.results["meta"].get("gpu", "cpu (dry run)"), "date": self.results["meta"]["date"][:10],
            "command": self.command,
        })

    # -- timing and inputs ----------------------------------------------------------------------------------------

    def time_ms(self, fn, warmup: int = 3, groups: int = 5) -> float:
        """Milliseconds per fn() call: the median over `groups` of (CUDA-event time of `reps` back-to-back calls) /
        reps, after warm-ups (which autotune). Back to back, as in a model, the host enqueues ahead of the GPU, so
        what is timed is the GPU's work, not the Python dispatch of one isolated call. Host clock on the CPU."""
        torch = self.torch
        for _ in range(1 if self.dry_run else warmup):
            fn()
        reps = self.s["reps"]
        times = []
        for _ in range(1 if self.dry_run else groups):
            if self.device == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / reps)
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / reps)
        return statistics.median(times)

    def fwd_and_bwd_ms(self, fn, inputs, graphed: bool = False) -> dict:
        """{"fwd_ms", "fwd_bwd_ms"} of fn(*inputs), the backward with a fixed cotangent, and with `graphed` on a GPU
        the same replayed from a CUDA graph ("fwd_graphed_ms", "fwd_bwd_graphed_ms": `graphed_ms`; the peak memory
        before the graphs' pools, "peak_GiB"; fn must not wait on the GPU). The gradients are returned
        (torch.autograd.grad), not accumulated into .grad: in a model q, k and v are activations whose gradients flow
        on to their projections, and an accumulating add of every full-length gradient would time a copy of ~0.4 GB
        that no training step runs (0.2-0.3 ms at this shape, on every variant)."""
        torch = self.torch
        cotangent = {}

        def fwd():
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd():
            y = fn(*inputs)
            if "g" not in cotangent:
                cotangent["g"] = torch.randn_like(y)
            torch.autograd.grad(y, inputs, cotangent["g"])

        if graphed:
            self.peak_reset()
        figures = {"fwd_ms": self.time_ms(fwd), "fwd_bwd_ms": self.time_ms(fwd_bwd)}
        if graphed and self.device == "cuda":  # after the eager timings, whose first calls tuned: none in a capture
            figures["peak_GiB"] = self.peak_gib()
            try:
                figures |= {"fwd_graphed_ms": self.graphed_ms(fwd), "fwd_bwd_graphed_ms": self.graphed_ms(fwd_bwd)}
            except Exception as error:  # noqa: BLE001 - the eager figures stand; the bars then take them
                figures["graph_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        return figures

    def graphed_ms(self, fn) -> float:
        """Milliseconds per fn() replayed from a CUDA graph: the GPU's time without the host's. The eager figures
        time calls queued back to back, which is the GPU's time only while the host enqueues faster than the GPU
        runs; the H200's host of session 8 did not for this op (call 2: the packed forward + backward 1.707 ms
        against 1.403 ms of kernels, the GPU idle between calls), while one cuDNN call needs little host time. A model
        step hides the host behind its other layers' GPU time, and ours and the peers are replayed alike (as
        bench/norm_rope_router.py's RMSNorm bars)."""
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))

    def fwd_breakdown(self, fn, inputs) -> dict:
        """kernel_breakdown of fn(*inputs) without autograd (the forward as fwd_ms times it)."""
        def forward():
            with self.torch.no_grad():
                fn(*inputs)

        return self.guarded(self.kernel_breakdown, forward)

    def fwd_bwd_breakdown(self, fn, inputs) -> dict:
        """kernel_breakdown of the forward + backward that fwd_bwd_ms times."""
        torch = self.torch
        cotangent = torch.randn_like(fn(*inputs)).detach()
        return self.guarded(self.kernel_breakdown, lambda: torch.autograd.grad(fn(*inputs), inputs, cotangent))

    @staticmethod
    def guarded(measure, *args) -> dict:
        """measure(*args), or its error: a breakdown is context, never fatal to its section."""
        try:
            return measure(*args)
        except Exception as error:  # noqa: BLE001 - recorded
            return {"error": f"{type(error).__name__}: {str(error)[:300]}"}

    def kernel_breakdown(self, fn, iterations: int = 5) -> dict:
        """What fn() runs on the GPU, from a torch.profiler trace of `iterations` back-to-back calls (after the timed
        ones, so nothing tunes here): per kernel, its launches and microseconds per call of fn; busy_us, the kernels'
        sum; span_us, first kernel start to last kernel end, per call. span - busy is the GPU left idle between
        kernels (launch gaps, host-bound stretches), which neither the tuner's per-kernel times nor busy_us count.
        On the CPU (dry run) the trace's operators, nested, so their sums overlap: the code path only."""
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile

        on_gpu = self.device == "cuda"
        categories = ("kernel", "gpu_memcpy", "gpu_memset") if on_gpu else ("cpu_op",)
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(iterations):
                fn()
            if on_gpu:
                torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            trace_path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace_path))
            events = [e for e in json.loads(trace_path.read_text())["traceEvents"]
                      if e.get("cat") in categories and "dur" in e]
        if not events:
            return {"error": "the trace holds no device events"}
        per_kernel: dict[str, dict] = {}
        for e in events:
            entry = per_kernel.setdefault(e["name"][:120], {"calls": 0, "us": 0.0})
            entry["calls"] += 1
            entry["us"] += e["dur"]
        kernels = {name: {"calls": v["calls"] / iterations, "us": round(v["us"] / iterations, 1)}
                   for name, v in sorted(per_kernel.items(), key=lambda item: -item[1]["us"])}
        start = min(e["ts"] for e in events)
        end = max(e["ts"] + e["dur"] for e in events)
        return {"iterations": iterations, "span_us": round((end - start) / iterations, 1),
                "busy_us": round(sum(e["dur"] for e in events) / iterations, 1), "kernels": kernels}

    def selection(self, B: int, T: int, fraction: float, seed: int = 20):
        """Bernoulli(fraction) per token, and its packing: (selected (B, T), index (B, S), positions (B, S), valid)."""
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)
        selected = torch.rand(B, T, device=self.device, generator=g) < fraction
        index, valid = self.routing.pack_selected(selected)
        return selected, index, torch.arange(T, device=self.device)[index], valid

    def randn(self, *shape, dtype=None):
        torch = self.torch
        t = torch.randn(*shape, device=self.device, dtype=torch.float32)
        return t.to(dtype or torch.float32).requires_grad_()

    def outputs_and_grads(self, fn, tensors, cotangent, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
        y = fn(*leaves)
        grads = self.torch.autograd.grad(y, leaves, cotangent.to(y.dtype))
        return [y.detach(), *grads]

    # -- sections -------------------------------------------------------------------------------------------------

    def _compare_bf16(self, record: dict, label: str, B, H, Hkv, T, Tk, D, Dv, fraction, window, seed) -> bool:
        """The kernel in bfloat16 against the float32 reference on the same (rounded) values: relative norm 1e-2 for
        the output and dq, dk, dv, all finite."""
        torch, pqa = self.torch, self.pqa
        _, _, positions, valid = self.selection(B, T, fraction, seed=seed)
        S = positions.shape[1]
        tensors = [self.randn(B, H, S, D, dtype=torch.bfloat16), self.randn(B, Hkv, Tk, D, dtype=torch.bfloat16),
                   self.randn(B, Hkv, Tk, Dv, dtype=torch.bfloat16)]
        cotangent = torch.randn(B, H, S, Dv, device=self.device)
        got = self.outputs_and_grads(lambda q, k, v: pqa.packed_query_attention(q, k, v, positions, valid,
                                                                                window=window),
                                     tensors, cotangent, torch.bfloat16)
        want = self.outputs_and_grads(lambda q, k, v: pqa.packed_query_attention_reference(q, k, v, positions, valid,
                                                                                          window=window),
                                      tensors, cotangent, torch.float32)
        errors = {n: rel_norm(a, e) for n, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
        ok = all(e <= 1e-2 for e in errors.values()) and all(bool(torch.isfinite(a).all()) for a in got)
        record[f"{label} B{B}-H{H}/{Hkv}-T{T}-Tk{Tk}-S{S}-D{D}-Dv{Dv}-w{window}"] = errors | {"ok": ok}
        return ok

    def numerics(self, record):
        """bf16 at the timing shape (its first calls autotune the three kernels)."""
        c = self.s["sparse"]
        B, H, T, D = c["B"], c["H"], c["T"], c["D"]
        record["ok"] = self._compare_bf16(record, "bf16 timing shape", B, H, H, T, T, D, D, self.s["fraction"], None,
                                          seed=20)

    def edges(self, record):
        """bf16 at ragged shapes on the configs the timing shape tuned (tuning each bucket anew would recompile every
        candidate): odd lengths, grouped heads, padding rows, a window, keys past every query (a cache's tail), all
        queries selected. float32 at 1e-5 is checked in the interpreter (tests/kernels), not here: float32 dots compile
        slowly."""
        torch, pqa = self.torch, self.pqa
        D = self.s["sparse"]["D"]
        tuned, timing_key = pqa.tuned_configs(), pqa.shape_key(D, D, 1, False, torch.bfloat16)
        ok = True
        for B, H, Hkv, T, Tk, fraction, window in (TINY_EDGE_CASES if self.dry_run else EDGE_CASES):
            key = pqa.shape_key(D, D, H // Hkv, window is not None, torch.bfloat16)
            pqa.pin_configs({name: {key: chosen[timing_key]} for name, chosen in tuned.items() if timing_key in chosen})
            ok &= self._compare_bf16(record, "bf16", B, H, Hkv, T, Tk, D, D, fraction, window, seed=T)
        record["ok"] = ok

    def _sdpa_peers(self, q, k, v, record) -> tuple[dict, dict]:
        """Causal SDPA over all queries with each backend that runs: the names of the fastest, by figure, and the
        functions by name."""
        import torch.nn.functional as F

        def dense(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

        variants = {"sdpa_default": dense}
        if self.device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                def with_backend(q, k, v, backend=backend):
                    with sdpa_kernel(backend):
                        return dense(q, k, v)

                variants[name] = with_backend
        for name, fn in variants.items():
            try:
                record[name] = self.fwd_and_bwd_ms(fn, (q, k, v), graphed=True)
            except Exception as error:  # noqa: BLE001 - a backend that cannot run is recorded
                record[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        timed = {n: record[n] for n in variants if "fwd_ms" in record[n]}
        figures = ("fwd_ms", "fwd_bwd_ms", "fwd_graphed_ms", "fwd_bwd_graphed_ms")
        best = {key: min((n for n in timed if key in timed[n]), key=lambda n: timed[n][key], default=None)
                for key in figures}
        return {key: name for key, name in best.items() if name is not None}, variants

    def sparse(self, record):
        torch, pqa, R = self.torch, self.pqa, self.routing
        c = self.s["sparse"]
        B, H, T, D = c["B"], c["H"], c["T"], c["D"]
        dt = torch.bfloat16
        selected, index, positions, valid = self.selection(B, T, self.s["fraction"])
        S = index.shape[1]
        record["shape"] = c | {"S": S, "selected_fraction": float(selected.float().mean()), "dtype": "bf16"}
        q_full, k, v = (self.randn(B, H, T, D, dtype=dt) for _ in range(3))
        q_packed = self.randn(B, H, S, D, dtype=dt)

        def kernel(q, k, v):  # what the HSPMN block runs: q projected from the selected tokens only
            return pqa.packed_query_attention(q, k, v, positions, valid)

        def kernel_full_length(q, k, v):  # from full-length q to full-length output, rows read and written in place
            return pqa.sparse_query_attention(q, k, v, selected)

        def kernel_end_to_end(q, k, v):  # from full-length q: pack, gather, attend, scatter
            index, valid = R.pack_selected(selected)
            pos = torch.arange(T, device=q.device)[index]
            y = pqa.packed_query_attention(R.gather_tokens(q, index, dim=2), k, v, pos, valid)
            return R.scatter_tokens(y, index, valid, T, dim=2)

        def chunked_sdpa(q, k, v):  # ops/routing.py without the kernel
            return R.packed_query_attention(q, k, v, positions, valid)

        record["kernel_packed"] = self.fwd_and_bwd_ms(kernel, (q_packed, k, v), graphed=True)
        record["kernel_full_length"] = self.fwd_and_bwd_ms(kernel_full_length, (q_full, k, v), graphed=True)
        if not self.bars_only:
            record["kernel_with_pack_gather_scatter"] = self.fwd_and_bwd_ms(kernel_end_to_end, (q_full, k, v))
            try:
                record["routing_chunked_sdpa_packed"] = self.fwd_and_bwd_ms(chunked_sdpa, (q_packed, k, v))
            except Exception as error:  # noqa: BLE001 - context only
                record["routing_chunked_sdpa_packed"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        best, peers = self._sdpa_peers(q_full, k, v, record)
        record["peer"] = best
        useful = 4 * H * D * float(positions.masked_fill(~valid, -1).add(1).sum())  # QK^T and PV over visible keys
        if not self.bars_only:
            record["kernel_backward_alone_ms"] = self.backward_alone_ms(q_packed, k, v, positions, valid, window=0)
            record["breakdown"] = {
                "kernel_packed_fwd_bwd": self.fwd_bwd_breakdown(kernel, (q_packed, k, v)),
                "kernel_full_length_fwd": self.fwd_breakdown(kernel_full_length, (q_full, k, v)),
                f"peer_{best['fwd_bwd_ms']}_fwd_bwd": self.fwd_bwd_breakdown(peers[best["fwd_bwd_ms"]],
                                                                             (q_full, k, v)),
            }
        record["kernel_packed"]["fwd_TFLOPs"] = useful / (record["kernel_packed"]["fwd_ms"] * 1e-3) / 1e12
        record["kernel_packed"]["fwd_bwd_TFLOPs"] = 3.5 * useful / (record["kernel_packed"]["fwd_bwd_ms"] * 1e-3) / 1e12
        for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            key, how = self.bar_timing(key, best, record["kernel_packed"], record["kernel_full_length"])
            peer = record[best[key]][key]
            reference = f"causal SDPA over all queries ({best[key]}{how})"
            self.bar(f"HSPMN sparse-query attention {label}, 20% selected (B8 16x128 L4096 bf16{how}) [packed-query "
                     "kernel]", record["kernel_packed"][key], reference, peer, 3.0)
            self.bar(f"HSPMN sparse-query attention {label}, 20% selected (B8 16x128 L4096 bf16{how}) [end to end: "
                     "full-length q in, full-length output out, sparse_query_attention]",
                     record["kernel_full_length"][key], reference, peer, 3.0)

    @staticmethod
    def bar_timing(key: str, peers: dict, *ours: dict) -> tuple[str, str]:
        """The figure a bar takes, and how it was timed: the CUDA graph's replays (see `graphed_ms`) where ours and
        the peer have them, else the eager calls'. peers: {figure: the name of its fastest peer}."""
        graphed = key.replace("_ms", "_graphed_ms")
        if graphed in peers and all(graphed in figures for figures in ours):
            return graphed, ", CUDA graph"
        return key, ""

    def window(self, record):
        torch, pqa = self.torch, self.pqa
        c = self.s["window_shape"]
        B, Hq, Hkv, T, D = c["B"], c["Hq"], c["Hkv"], c["T"], c["D"]
        W = self.s["window"]
        dt = torch.bfloat16
        record["shape"] = c | {"window": W, "dtype": "bf16"}
        q, k, v = self.randn(B, Hq, T, D, dtype=dt), self.randn(B, Hkv, T, D, dtype=dt), self.randn(B, Hkv, T, D, dtype=dt)
        positions = torch.arange(T, device=self.device).expand(B, T)
        valid = torch.ones(B, T, dtype=torch.bool, device=self.device)

        def kernel(q, k, v):
            return pqa.packed_query_attention(q, k, v, positions, valid, window=W)

        # The window bucket is tuned on its own (its grouped heads and band favour other blocks than `sparse`).
        attention_runtime = load_module("sparse_bench_attention", "templates/runtime/attention.py")
        token_positions = torch.arange(T, device=self.device)

        def banded_sdpa(q, k, v):  # what an attention layer with a window runs without the kernel
            return attention_runtime.attention(q, k, v, q_positions=token_positions, k_positions=token_positions,
                                               window=W)

        variants = {"kernel": kernel}  # then the bar's peer, then the context: a run cut short keeps the bar
        if self.device == "cuda":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def sliding(b, h, qi, ki):
                return (ki <= qi) & (qi - ki < W)

            mask = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device=self.device)
            compiled = torch.compile(flex_attention)
            variants["peer_flex"] = lambda q, k, v: compiled(q, k, v, block_mask=mask, enable_gqa=True)
        if not self.bars_only:
            variants["archgen_banded_sdpa"] = banded_sdpa
        for name, fn in variants.items():
            try:  # the bar's two in CUDA graphs too; the banded SDPA is context
                record[name] = self.fwd_and_bwd_ms(fn, (q, k, v), graphed=name != "archgen_banded_sdpa")
            except Exception as error:  # noqa: BLE001 - a failing peer is recorded
                record[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            self.write()
        if not self.bars_only:
            record["kernel_backward_alone_ms"] = self.backward_alone_ms(q, k, v, positions, valid, window=W)
            record["breakdown"] = {f"{name}_fwd_bwd": self.fwd_bwd_breakdown(variants[name], (q, k, v))
                                   for name in ("kernel", "peer_flex") if "fwd_ms" in record.get(name, {})}
        window_key = pqa.shape_key(D, D, Hq // Hkv, True, dt)
        record["configs"] = {name: chosen.get(window_key) for name, chosen in pqa.tuned_configs().items()}
        with torch.no_grad():
            ours = kernel(q, k, v)
            if "peer_flex" in variants:
                record["kernel_vs_flex_rel_norm"] = rel_norm(ours, variants["peer_flex"](q, k, v))
            else:  # dry run: against the reference
                record["kernel_vs_reference_rel_norm"] = rel_norm(
                    ours, pqa.packed_query_attention_reference(q, k, v, positions, valid, window=W))
        peer = record.get("peer_flex", {})
        for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            if key in peer and key in record["kernel"]:
                key, how = self.bar_timing(key, {k: "peer_flex" for k in peer}, record["kernel"])
                self.bar(f"sliding window 1024 attention {label} (B4 32q/8kv L4096 D128 bf16{how}) [packed-query "
                         "kernel, all positions]", record["kernel"][key], f"torch.compile(flex_attention), "
                         f"sliding-window block mask{how}", peer[key], 1.0)

    def ncu(self, record):
        """Nsight Compute on the backward kernels (ncu_backward's launches, in a child process); a dry run only runs
        the workload."""
        if self.dry_run:
            record["variants"] = ncu_backward(self.device)
            return
        record.update(ncu.profile(Path(__file__), "backward", "_backward_(dq|dkdv)_kernel", self.out / "ncu",
                                  timeout_s=max(self.budget_s - self.elapsed(), NCU_NEEDS_S)))

    def backward_alone_ms(self, q, k, v, positions, valid, window: int) -> float:
        """The two backward kernels (and delta) alone, from a forward that kept its float32 output."""
        torch, pqa = self.torch, self.pqa
        kernel_positions, scale = pqa.kernel_positions(positions, valid), 1.0 / math.sqrt(q.shape[-1])
        with torch.no_grad():
            q, k, v = q.detach(), k.detach(), v.detach()
            out, lse, out32 = pqa.packed_query_attention_forward(q, k, v, kernel_positions, scale, window,
                                                                 keep_float32_out=True)
            dout = torch.randn_like(out)
            return self.time_ms(lambda: pqa.packed_query_attention_backward(dout, q, k, v, kernel_positions, out32,
                                                                            lse, scale, window))

    def peak_reset(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if self.device == "cuda":
            return round(self.torch.cuda.max_memory_allocated() / 2**30, 2)
        return None

    def summary(self) -> str:
        lines = [f"{'figure':110s} {'archgen':>9s} {'ref':>9s} {'ratio':>6s} {'bar':>5s}"]
        for b in self.bars:
            lines.append(f"{b['figure'][:110]:110s} {b['archgen']:9.3f} {b['reference_value']:9.3f} {b['ratio']:6.2f} "
                         f"{b['bar']:5.2f} {'PASS' if b['ratio'] >= b['bar'] else 'miss'}")
        for name in ("numerics", "edges"):
            record = self.results["sections"].get(name, {})
            if record.get("ok") is False:
                lines.append(f"NUMERICS FAILED in {name}: " + ", ".join(k for k, v in record.items()
                                                                       if isinstance(v, dict) and not v.get("ok")))
        lines += ncu.summary_lines(self.results["sections"].get("ncu", {}))
        for name, record in self.results["sections"].items():
            if "error" in record:
                lines.append(f"ERROR in {name}: {record['error'][:200]}")
        return "\n".join(lines)


def ncu_backward(device: str) -> list[list]:
    """The launches ncu profiles, each once after a warm-up (compiles; nothing is tuned): the backward (its dq kernel,
    then its dk/dv kernel) on each kernel's first config (the fastest measured so far), at the `sparse` shape, then at
    the `window` one. Returns [label, launches] in launch order (bench/ncu.py)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from archgen.resources import kernels_package

    kernels_package()
    from archgen_kernels import packed_query_attention as pqa

    s = TINY if device != "cuda" else FULL
    g = torch.Generator(device=device).manual_seed(0)
    c, w = s["sparse"], s["window_shape"]
    selected = torch.rand(c["B"], c["T"], device=device, generator=g) < s["fraction"]
    tokens = torch.arange(c["T"], device=device)
    order = torch.argsort((~selected).long() * c["T"] + tokens, dim=1)  # selected tokens first, in order
    counts = selected.sum(dim=1, keepdim=True)
    S = int(counts.max())
    sparse_positions = torch.where(tokens[:S] < counts, order[:, :S], -1).to(torch.int32)
    window_positions = torch.arange(w["T"], device=device, dtype=torch.int32).expand(w["B"], w["T"])
    first = {"dq": pqa.BACKWARD_DQ_CONFIGS[0], "dkdv": pqa.BACKWARD_DKDV_CONFIGS[0]}

    def backward(H, Hkv, positions, T, window, configs):
        D = c["D"]
        q = torch.randn(positions.shape[0], H, positions.shape[1], D, device=device, generator=g).bfloat16()
        k, v = (torch.randn(positions.shape[0], Hkv, T, D, device=device, generator=g).bfloat16() for _ in range(2))
        scale = 1.0 / math.sqrt(D)
        out, lse, out32 = pqa.packed_query_attention_forward(q, k, v, positions, scale, window, keep_float32_out=True,
                                                             config=pqa.FORWARD_CONFIGS[0])
        dout = torch.randn_like(out)
        return lambda: pqa.packed_query_attention_backward(dout, q, k, v, positions, out32, lse, scale, window,
                                                           configs=configs)

    launches = {
        f"sparse, first configs {first}": backward(c["H"], c["H"], sparse_positions, c["T"], 0, first),
        f"window, first configs {first}": backward(w["Hq"], w["Hkv"], window_positions, w["T"], s["window"], first),
    }
    for run in launches.values():  # compiled and warm before the profiled region
        run()
    with ncu.profiled(device):
        for run in launches.values():
            run()
    return [[label, 2] for label in launches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench/results")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)},ncu (ncu: as --ncu)")
    parser.add_argument("--ncu", action="store_true", help="then profile the backward kernels with Nsight Compute")
    parser.add_argument("--ncu-child", help=argparse.SUPPRESS)  # the workload a child under ncu runs (bench/ncu.py)
    parser.add_argument("--budget-s", type=float, default=110.0, help="stop starting sections after this many seconds")
    parser.add_argument("--bars-only", action="store_true",
                        help="only the bars' figures and their peers (no context variants, breakdowns, backward alone)")
    parser.add_argument("--untuned", action="store_true",
                        help="each kernel on its first config (the fastest measured so far), nothing tuned: no compiles "
                             "of the other candidates")
    parser.add_argument("--pin", type=Path, help="pin the configs an earlier run's sparse_attention.json tuned (its "
                        "tuned_configs, per kernel and shape bucket); implies --untuned for the buckets it lacks")
    args = parser.parse_args()
    if args.ncu_child:
        ncu.child_main({"backward": ncu_backward}, args.ncu_child, args.out)
        return
    only = {s for s in args.only.split(",") if s}
    if only - {*SECTIONS, "ncu"}:
        parser.error(f"unknown sections {sorted(only - {*SECTIONS, 'ncu'})}; choose from {','.join(SECTIONS)},ncu")
    profile = args.ncu or "ncu" in only
    if args.dry_run:  # before triton is imported: the kernels run on CPU tensors in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"
    budget_s = math.inf if args.dry_run else args.budget_s  # the interpreter's minutes are no GPU budget
    bench = Bench(args.out, args.dry_run, budget_s, only | {"ncu"} if only and profile else only, args.bars_only)
    if args.untuned or args.pin:
        from archgen_kernels import triton_support  # the repository's, registered when Bench imported its kernels

        triton_support.RUNTIME_TUNING = False  # an untuned bucket runs its tuner's first candidate
    if args.pin:
        pinned = json.loads(args.pin.read_text())["tuned_configs"]
        bench.pqa.pin_configs(pinned)
        bench.results["pinned_from"] = {"file": str(args.pin), "configs": pinned}
    needs = {"numerics": 45, "sparse": 15, "window": 45, "edges": 15}  # seconds, compiles included: a late section is skipped
    runs = {"numerics": bench.numerics, "sparse": bench.sparse, "edges": bench.edges, "window": bench.window}
    for name in SECTIONS:
        bench.section(name, runs[name], 0 if args.dry_run else needs[name])
    if profile:
        bench.section("ncu", bench.ncu, 0 if args.dry_run else NCU_NEEDS_S)
    print(bench.summary())
    print(f"wrote {args.out / 'sparse_attention.json'} and {args.out / 'sparse_attention.bars.json'} "
          f"in {bench.elapsed():.0f}s")


if __name__ == "__main__":
    main()
