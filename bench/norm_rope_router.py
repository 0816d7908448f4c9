"""The small fused kernels of issue 11 on the GPU, each against its floor and its peers in the same run.

  rmsnorm  kernels/rmsnorm.py at 32768 × 4096 bf16, plain and with the residual add fused: the tuners' choice at this
           shape (every candidate's time recorded), numerics against float64, then
             kernels alone      forward and backward launchers, each against the copy bandwidth of its bytes
             fwd+bwd autograd   the differentiable op, as a model runs it, against Liger-Kernel and F.rms_norm
             fwd+bwd graphed    the same replayed from a CUDA graph: GPU time without the host's launch overhead
             fwd+bwd custom op  the same through the custom op archgen_v1::rms_norm, as torch.compile and
                                torch.export see it (eager mode takes an autograd.Function): what the custom
                                op's dispatch costs the host
             profile            each variant's kernels and their GPU times (torch.profiler)
             host               each variant's host microseconds per call (queued without a wait: when it is
                                above the GPU time the call is host-bound), and a profiler table of host and GPU
                                time per op (rmsnorm_<variant>_fwd_bwd_profile.txt under --out)
           Bytes the ideal fused op must move, R·N elements each: forward reads x and writes y (2; fused: x, residual,
           y, s: 4); backward reads x and dy and writes dx (3; fused: s, dy, ds_out, ds: 4); rstd (R floats) and
           the weight (N) are left out (under 0.1%). fwd+bwd: 5 (fused 8).
  rope     kernels/rope.py on q and k at batch 4, 32 query / 8 key-value heads, 4096 tokens, head_dim 128 (full and
           half rotary), bf16: numerics for every scaling against float64, then in place (inference) and
           differentiable (training, forward+backward) against ops/attention.py's apply_rope_qk (the reference path
           a model without the kernel runs), Liger-Kernel's RoPE where it imports, and the copy floor (read and
           write q and k once; in place, only the rotated channels).
  router   kernels/moe_router.py: softmax, top-k, load-balancing statistics and z-loss in one pass, at 32768 tokens,
           16 experts, top-2 (Zipf-like router logits), against ops/moe.py's route_top_k + load_balancing_loss +
           router_z_loss; forward and forward+backward; numerics (the same experts, weights, losses and logit
           gradient).

  ncu      (with --ncu, after the others) Nsight Compute on the RMSNorm kernels at the rmsnorm shape (bench/ncu.py):
           our forward at its default config and at 4 warps, Liger's forward, our backward (and its dw sum) and
           Liger's, each launched once in a child process under ncu: DRAM bytes and throughput, occupancy,
           registers, instructions and stall reasons per launch in the JSON, ncu's tables in ncu/rmsnorm.ncu.txt.
           It tells apart kernels whose timings differ by a few percent (our forward against Liger's).

Writes norm_rope_router.json and norm_rope_router.bars.json ({"figure", "archgen", "unit", "reference",
"reference_value", "ratio", "bar", "device", "date", "command"}; ratio > 1 means archgen is better) under --out.

    python bench/norm_rope_router.py --out "$OUT" --budget-s 110     # on the GPU
    python bench/norm_rope_router.py --only rmsnorm --ncu --out "$OUT"  # with Nsight Compute's view of the kernels
    python bench/norm_rope_router.py --dry-run --out /tmp/nrr         # CPU: Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"
sys.path.insert(0, str(ROOT))

import ncu  # noqa: E402 - bench/ncu.py, beside this script
import torch  # noqa: E402
import triton  # noqa: E402
from harness import bar_ratio  # noqa: E402 - bench/ is on sys.path when a script runs

from archgen.benchmark import copy_bandwidth, timed  # noqa: E402
from archgen.resources import kernels_package  # noqa: E402
from templates.runtime import attention as runtime_attention  # noqa: E402
from templates.runtime import moe as runtime_moe  # noqa: E402

EPS = 1e-6
NORM_SHAPE, DRY_NORM_SHAPE = (32768, 4096), (48, 64)
ROPE_SHAPE, DRY_ROPE_SHAPE = (4, 32, 8, 4096, 128), (1, 2, 1, 8, 16)  # B, Hq, Hk, T, D
ROUTER_SHAPE, DRY_ROUTER_SHAPE = (32768, 16, 2), (40, 6, 2)  # tokens, experts, top_k
SECTIONS = {"rmsnorm": 30, "rope": 20, "router": 10}
"""The sections in the order they run, with the seconds each needs at the least, so a late one is skipped rather
than cut off."""
NCU_NEEDS_S = 60
"""What the ncu section needs: a child process (torch, the kernels compiled), ncu replaying each launch per section."""
LLAMA3 = {"scaling": "llama3", "factor": 8.0, "original_max_position": 8192}


def rope_scalings(T: int) -> dict[str, dict]:
    """rope_inv_freq's arguments for every scaling the spec language has, at a trained context below T."""
    trained = max(T // 4, 4)
    return {"none": {}, "linear": {"scaling": "linear", "factor": 4.0}, "ntk": {"scaling": "ntk", "factor": 4.0},
            "yarn": {"scaling": "yarn", "factor": 4.0, "original_max_position": trained},
            "llama3": {**LLAMA3, "original_max_position": trained}}


class Bench:
    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        self.out, self.dry_run, self.budget_s = out, dry_run, budget_s
        self.device = "cpu" if dry_run else "cuda"
        self.started = time.perf_counter()
        self.command = "python bench/norm_rope_router.py " + " ".join(sys.argv[1:])
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "triton": triton.__version__, "dry_run": dry_run, "command": self.command}
        if not dry_run:
            meta["gpu"] = torch.cuda.get_device_name()
        self.results = {"meta": meta, "sections": {}}
        self.bars: list[dict] = []
        self.copy_TBps: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def section(self, name: str, run, needs_s: float) -> None:
        """Run one section into results["sections"][name]; a failure is recorded, never fatal; a section that would
        not fit in the budget is skipped and says so."""
        record = self.results["sections"].setdefault(name, {})
        if not self.dry_run and self.elapsed() + needs_s > self.budget_s:  # a dry run checks every section
            record["skipped"] = f"budget: {self.elapsed():.0f}s spent, ~{needs_s:.0f}s needed, --budget-s {self.budget_s:.0f}"
            return
        started = time.perf_counter()
        try:
            run(record)
        except Exception as error:  # noqa: BLE001 - a failing section is recorded, the others still run
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc()[-3000:]
        record["seconds"] = round(time.perf_counter() - started, 1)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "norm_rope_router.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        (self.out / "norm_rope_router.bars.json").write_text(json.dumps(self.bars, indent=1) + "\n")

    def bar(self, figure: str, archgen: float, unit: str, reference: str, reference_value: float, ratio: float,
            bar: float) -> None:
        self.bars.append({"figure": figure, "archgen": round(archgen, 4), "unit": unit, "reference": reference,
                          "reference_value": round(reference_value, 4), "ratio": bar_ratio(ratio, bar), "bar": bar,
                          "device": self.results["meta"].get("gpu", "cpu (dry run)"),
                          "date": self.results["meta"]["date"][:10], "command": self.command})

    def time_ms(self, fn) -> float:
        """Median milliseconds (triton's do_bench, L2 flushed between runs, on the GPU; the host clock on the CPU)."""
        if self.dry_run:
            return timed(fn, "cpu", 2, warmup=1) * 1e3
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def graphed_ms(self, fn) -> float | None:
        """Milliseconds of fn replayed from a CUDA graph (GPU time, no host launch overhead); None on the CPU."""
        if self.dry_run:
            return None
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))

    def host_us(self, fn) -> float:
        """Host microseconds per call of fn, the calls queued back to back with no wait on the GPU (fn must be
        warm): the time the GPU waits for when a call is host-bound."""
        calls = 2 if self.dry_run else 20
        if not self.dry_run:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - started) / calls * 1e6
        if not self.dry_run:
            torch.cuda.synchronize()
        return host

    def profile_table(self, fn, name: str, runs: int = 5) -> str | None:
        """Write the host (CPU) and GPU time per op of `runs` calls of fn to <out>/<name>_profile.txt; its file name."""
        if self.dry_run:
            return None
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                fn()
            torch.cuda.synchronize()
        path = self.out / f"{name}_profile.txt"
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{runs} calls\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        return path.name

    def copy(self) -> float:
        """The device copy bandwidth measured in this run, bytes read + written per second."""
        if self.copy_TBps is None:
            self.copy_TBps = copy_bandwidth(self.device) / 1e12
        return self.copy_TBps * 1e12

    def kernel_profile(self, fn, runs: int = 3) -> list[dict] | None:
        """The GPU kernels one call of fn launches, with their mean microseconds per call (torch.profiler)."""
        if self.dry_run:
            return None
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        events.sort(key=lambda e: -e.device_time_total)
        return [{"kernel": e.key[:120], "calls_per_run": e.count / runs, "us_per_run": round(e.device_time_total / runs, 2)}
                for e in events[:12]]

    # -- RMSNorm -------------------------------------------------------------------------------------------------

    def rmsnorm(self, record: dict) -> None:
        kernels_package()
        import torch.nn.functional as F

        from archgen_kernels import rmsnorm as rn

        R, N = DRY_NORM_SHAPE if self.dry_run else NORM_SHAPE
        dt = torch.float32 if self.dry_run else torch.bfloat16
        record["shape"], record["dtype"] = [R, N], str(dt)
        copy = self.copy()
        record["copy_TBps"] = copy / 1e12
        elements = R * N * dt.itemsize
        g = torch.Generator(device=self.device).manual_seed(0)
        x, res, dy, ds_out = (torch.randn(R, N, device=self.device, generator=g).to(dt) for _ in range(4))
        w = (1 + 0.1 * torch.randn(N, device=self.device, generator=g)).to(dt)

        # the tuners at this shape: every candidate's time is the sweep of the launch space
        for fused in (None, res):
            _, s, rstd = rn.rms_norm_forward(x, fused, w, EPS)
            rn.rms_norm_backward(dy, ds_out if fused is not None else None, s, w, rstd)
        record["chosen"] = {"forward": dict(rn.FORWARD_TUNER.chosen), "backward": dict(rn.BACKWARD_TUNER.chosen)}
        record["tuner_timings_ms"] = {"forward": dict(rn.FORWARD_TUNER.timings),
                                      "backward": dict(rn.BACKWARD_TUNER.timings)}
        record["numerics"] = self._rmsnorm_numerics(rn, x, res, w, dy, ds_out)

        _, s_plain, rstd_plain = rn.rms_norm_forward(x, None, w, EPS)
        _, s_fused, rstd_fused = rn.rms_norm_forward(x, res, w, EPS)
        alone = {
            "fwd": (lambda: rn.rms_norm_forward(x, None, w, EPS), 2),
            "bwd": (lambda: rn.rms_norm_backward(dy, None, s_plain, w, rstd_plain), 3),
            "fused_fwd": (lambda: rn.rms_norm_forward(x, res, w, EPS), 4),
            "fused_bwd": (lambda: rn.rms_norm_backward(dy, ds_out, s_fused, w, rstd_fused), 4),
        }
        record["kernels_alone"] = {}
        for name, (fn, tensors) in alone.items():
            ms = self.time_ms(fn)
            record["kernels_alone"][name] = {"ms": ms, "of_copy": tensors * elements / (ms * 1e-3) / copy}

        variants = {"archgen": lambda x, w: rn.rms_norm(x, w, EPS),
                    "archgen (through the custom op)": lambda x, w: rn.rms_norm_op(x, w, EPS)[0],
                    "F.rms_norm": lambda x, w: F.rms_norm(x, (N,), w, EPS)}
        fused_variants = {"archgen": lambda x, r, w: rn.add_rms_norm(x, r, w, EPS),
                          "eager (x + res, F.rms_norm)": lambda x, r, w: (F.rms_norm(x + r, (N,), w, EPS), x + r)}
        try:
            import liger_kernel  # noqa: F401 - its version is recorded
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            record["liger_version"] = _version("liger_kernel")
            variants["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
            fused_variants["liger"] = lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)
        except Exception as error:  # noqa: BLE001 - Liger missing (the CPU) is recorded, the rest still runs
            record["liger_import"] = f"{type(error).__name__}: {error}"[:300]

        peer = "liger" if "liger" in variants else "F.rms_norm"
        record["fwd_placement"] = self._placement(variants["archgen"], peer, variants[peer], x, w)

        leaves = {name: t.detach().clone().requires_grad_() for name, t in (("x", x), ("res", res), ("w", w))}
        for prefix, table, args, cots, fwd_tensors, total_tensors in (
                ("", variants, (leaves["x"], leaves["w"]), [dy], 2, 5),
                ("add_", fused_variants, (leaves["x"], leaves["res"], leaves["w"]), [dy, ds_out], 4, 8)):
            for name, fn in table.items():
                try:
                    with torch.no_grad():
                        f = self.time_ms(lambda fn=fn, args=args: fn(*args))
                    run = _fwd_bwd(fn, args, cots)
                    b = self.time_ms(run)
                    record[prefix + name] = {"fwd_ms": f, "fwd_bwd_ms": b,
                                             "fwd_of_copy": fwd_tensors * elements / (f * 1e-3) / copy,
                                             "fwd_bwd_of_copy": total_tensors * elements / (b * 1e-3) / copy}
                except Exception as error:  # noqa: BLE001 - a failing variant is recorded, the others still run
                    record[prefix + name] = {"error": f"{type(error).__name__}: {error}"[:300]}
                    continue
                figures = record[prefix + name]
                with torch.no_grad():
                    figures["fwd_host_us"] = self.host_us(lambda fn=fn, args=args: fn(*args))
                figures["fwd_bwd_host_us"] = self.host_us(run)
                try:
                    figures["profile_table"] = self.profile_table(
                        run, f"rmsnorm_{prefix}{_slug(name)}_fwd_bwd")
                    graphed = self.graphed_ms(run)
                    if graphed is not None:
                        figures["fwd_bwd_graphed_ms"] = graphed
                        figures["fwd_bwd_graphed_of_copy"] = total_tensors * elements / (graphed * 1e-3) / copy
                    graphed = self.graphed_ms(lambda fn=fn, args=args: _without_grad(fn, args))
                    if graphed is not None:
                        figures["fwd_graphed_ms"] = graphed
                        figures["fwd_graphed_of_copy"] = fwd_tensors * elements / (graphed * 1e-3) / copy
                    figures["profile"] = self.kernel_profile(run)
                except Exception as error:  # noqa: BLE001 - the graph or the profiler failing leaves the timings
                    figures["graph_or_profile_error"] = f"{type(error).__name__}: {error}"[:300]

        dtype = str(dt).removeprefix("torch.")
        for prefix, what in (("", "RMSNorm"), ("add_", "RMSNorm + residual add")):
            ours, liger = record.get(f"{prefix}archgen", {}), record.get(f"{prefix}liger", {})
            # The bars take the GPU's time, replayed from a CUDA graph where it was: the eager call's time depends on
            # how fast the run's host is (call 3 of session 7: 754 µs of host for 356 µs of kernels), ours and Liger's
            # alike; the eager figures stay in the record
            for key, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
                timing = f"{key}_graphed" if f"{key}_graphed_ms" in ours and f"{key}_graphed_ms" in liger else key
                if f"{timing}_ms" not in ours:
                    continue
                how = ", CUDA graph" if timing != key else ""
                tb = ours[f"{timing}_of_copy"] * copy / 1e12
                self.bar(f"{what} {label} {R}x{N} {dtype}{how}", tb, "TB/s", "copy bandwidth in the run", copy / 1e12,
                         ours[f"{timing}_of_copy"], 0.9)
                if f"{timing}_ms" in liger:
                    self.bar(f"{what} {label} {R}x{N} {dtype}{how} vs Liger", ours[f"{timing}_ms"], "ms",
                             f"Liger-Kernel {record.get('liger_version')}", liger[f"{timing}_ms"],
                             liger[f"{timing}_ms"] / ours[f"{timing}_ms"], 1.0)

    def _placement(self, ours, peer_name: str, peer, x, w, copies: int = 3) -> list[dict]:
        """Our forward and the peer's (Liger's; F.rms_norm without Liger), alternating, on copies of x at other
        addresses (a pad allocated before each copy moves it; each output lands where the allocator puts it): whether
        the 1-3% between our forward and Liger's follows the kernels or where their tensors sit in DRAM."""
        rounds, keep = [], []
        for copy in range(copies):
            keep.append(torch.empty(((copy + 1) * 3 << 20,), dtype=torch.uint8, device=self.device))  # 3, 6, 9 MB
            moved = x.clone()
            keep.append(moved)
            with torch.no_grad():
                rounds.append({"x_address_mod_64MB": moved.data_ptr() % (64 << 20),
                               "archgen_ms": self.time_ms(lambda moved=moved: ours(moved, w)),
                               "peer": peer_name, "peer_ms": self.time_ms(lambda moved=moved: peer(moved, w))})
        return rounds

    def _rmsnorm_numerics(self, rn, x, res, w, dy, ds_out) -> dict:
        """Relative norm errors against float64 of y (s) and every gradient, at the bench shape."""
        errors = {}
        for fused in (False, True):
            inputs = (x, res, w) if fused else (x, w)
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = rn.add_rms_norm(*leaves, EPS) if fused else (rn.rms_norm(*leaves, EPS),)
            torch.autograd.backward(list(out), [dy, ds_out] if fused else [dy])
            exact = [t.detach().double().requires_grad_() for t in inputs]
            if fused:
                s = exact[0] + exact[1]
                want = (rn.rms_norm_reference(s, exact[2], EPS), s)
            else:
                want = (rn.rms_norm_reference(*exact, EPS),)
            torch.autograd.backward(list(want), [dy.double(), ds_out.double()] if fused else [dy.double()])
            names = (["y", "s"] if fused else ["y"]) + (["dx", "dresidual", "dw"] if fused else ["dx", "dw"])
            got = [*out, *(t.grad for t in leaves)]
            expected = [*want, *(t.grad for t in exact)]
            errors["add_rms_norm" if fused else "rms_norm"] = {
                name: _relative(a, e) for name, a, e in zip(names, got, expected, strict=True)}
        tolerance = 1e-5 if x.dtype == torch.float32 else 1e-2
        errors["ok"] = all(v <= tolerance for case in errors.values() for v in case.values())
        return errors

    def ncu(self, record: dict) -> None:
        """Nsight Compute on the RMSNorm kernels (ncu_rmsnorm's launches); a dry run only runs the workload."""
        if self.dry_run:
            record["variants"] = ncu_rmsnorm(self.device)
            return
        record.update(ncu.profile(Path(__file__), "rmsnorm", "_rms_norm_", self.out / "ncu",
                                  timeout_s=max(self.budget_s - self.elapsed(), NCU_NEEDS_S)))

    # -- RoPE ----------------------------------------------------------------------------------------------------

    def rope(self, record: dict) -> None:
        kernels_package()
        from archgen_kernels import rope

        B, HQ, HK, T, D = DRY_ROPE_SHAPE if self.dry_run else ROPE_SHAPE
        dt = torch.float32 if self.dry_run else torch.bfloat16
        record["shape"] = {"batch": B, "q_heads": HQ, "kv_heads": HK, "tokens": T, "head_dim": D, "dtype": str(dt)}
        record["copy_TBps"] = self.copy() / 1e12
        g = torch.Generator(device=self.device).manual_seed(0)

        def projected(H):  # (B, H, T, D) as a projection's view-and-transpose gives it
            return torch.randn(B, T, H * D, device=self.device, generator=g).to(dt).view(B, T, H, D).transpose(1, 2)

        q, k = projected(HQ), projected(HK)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        positions = torch.arange(T, device=self.device)
        record["numerics"] = {}
        for name, scaling in rope_scalings(T).items():
            for rotary in (D, D // 2):
                inv_freq, mscale = runtime_attention.rope_inv_freq(rotary, theta=500000.0, **scaling)
                cos, sin = runtime_attention.rope_cos_sin(inv_freq, positions, mscale)
                record["numerics"][f"{name} R{rotary}"] = self._rope_numerics(rope, q, k, cos, sin, dq, dk)
        tolerance = 1e-5 if dt == torch.float32 else 1e-2
        record["numerics"]["ok"] = all(v <= tolerance for case in record["numerics"].values() for v in case.values())

        for rotary in (D, D // 2):
            inv_freq, mscale = runtime_attention.rope_inv_freq(rotary, theta=500000.0, **LLAMA3)
            cos, sin = runtime_attention.rope_cos_sin(inv_freq, positions, mscale)
            figures = self._rope_speed(rope, q, k, dq, dk, cos, sin)
            record[f"R{rotary}"] = figures
            liger = self._liger_rope(q, k, inv_freq, positions, mscale)
            if liger is not None:
                try:
                    with torch.no_grad():
                        figures["inference_liger_ms"] = self.time_ms(liger)
                except Exception as error:  # noqa: BLE001 - the peer failing (a partial width, say) is recorded
                    figures["liger_error"] = f"{type(error).__name__}: {error}"[:300]
                    continue
                figures["inference_vs_liger"] = figures["inference_liger_ms"] / figures["inference_kernel_in_place_ms"]

    def _rope_speed(self, rope, q, k, dq, dk, cos, sin) -> dict:
        """In place (inference) and differentiable (training) against the reference path and the copy floor."""
        B, HQ, T, D = q.shape
        rows = B * (HQ + k.shape[1]) * T
        copy_all = 2 * rows * D * q.dtype.itemsize  # read and write every channel of q and k once
        copy_rotated = 2 * rows * 2 * cos.shape[-1] * q.dtype.itemsize  # in place: the rotated channels only
        q_work, k_work = q.clone(), k.clone()

        def in_place():
            rope.apply_rope_qk(q_work, k_work, cos, sin)

        figures = {}
        with torch.no_grad():
            figures["inference_kernel_in_place_ms"] = self.time_ms(in_place)
            figures["inference_reference_ms"] = self.time_ms(lambda: runtime_attention.apply_rope_qk(q, k, cos, sin))
        leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
        figures["training_kernel_ms"] = self.time_ms(_fwd_bwd(lambda q, k: rope.apply_rope_qk(q, k, cos, sin),
                                                              leaves, [dq, dk]))
        figures["training_reference_ms"] = self.time_ms(
            _fwd_bwd(lambda q, k: runtime_attention.apply_rope_qk(q, k, cos, sin), leaves, [dq, dk]))
        copy = self.copy()
        figures["inference_of_copy"] = copy_rotated / (figures["inference_kernel_in_place_ms"] * 1e-3) / copy
        figures["training_of_copy"] = 2 * copy_all / (figures["training_kernel_ms"] * 1e-3) / copy
        figures["inference_speedup"] = figures["inference_reference_ms"] / figures["inference_kernel_in_place_ms"]
        figures["training_speedup"] = figures["training_reference_ms"] / figures["training_kernel_ms"]
        with torch.no_grad():
            figures["inference_profile"] = self.kernel_profile(in_place)
        return figures

    def _rope_numerics(self, rope, q, k, cos, sin, dq, dk) -> dict:
        leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
        out = rope.apply_rope_qk(*leaves, cos, sin)
        torch.autograd.backward(list(out), [dq, dk])
        exact = [q.detach().double().requires_grad_(), k.detach().double().requires_grad_()]
        want = runtime_attention.apply_rope_qk(*exact, cos.double(), sin.double())
        torch.autograd.backward(list(want), [dq.double(), dk.double()])
        with torch.no_grad():
            q_in_place, k_in_place = q.clone(), k.clone()
            rope.apply_rope_qk(q_in_place, k_in_place, cos, sin)
        pairs = {"q": (out[0], want[0]), "k": (out[1], want[1]), "dq": (leaves[0].grad, exact[0].grad),
                 "dk": (leaves[1].grad, exact[1].grad), "q in place": (q_in_place, want[0]),
                 "k in place": (k_in_place, want[1])}
        return {name: _relative(a, e) for name, (a, e) in pairs.items()}

    def _liger_rope(self, q, k, inv_freq, positions, mscale):
        """Liger-Kernel's RoPE (in place, Hugging Face's duplicated cos/sin of width rotary_dim) on copies of q and k;
        None where it does not import."""
        if self.dry_run:
            return None
        try:
            from liger_kernel.ops.rope import LigerRopeFunction
        except Exception:  # noqa: BLE001 - Liger missing: no peer
            return None
        angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
        full = torch.cat([angles, angles], dim=-1)[None]  # (1, T, rotary_dim)
        cos, sin = (full.cos() * mscale).to(q.dtype), (full.sin() * mscale).to(q.dtype)
        q_work, k_work = q.clone(), k.clone()
        return lambda: LigerRopeFunction.apply(q_work, k_work, cos, sin)

    # -- MoE router ----------------------------------------------------------------------------------------------

    def router(self, record: dict) -> None:
        kernels_package()
        from archgen_kernels import moe_router

        N, E, top_k = DRY_ROUTER_SHAPE if self.dry_run else ROUTER_SHAPE
        record["shape"] = {"tokens": N, "experts": E, "top_k": top_k, "logits": "float32"}
        g = torch.Generator(device=self.device).manual_seed(0)
        # Zipf-like imbalance: expert e's logits are shifted by log(1 / (e + 1)), so popularity falls as 1/(e+1)
        skew = -torch.log(torch.arange(1, E + 1, device=self.device, dtype=torch.float32))
        logits = torch.randn(N, E, device=self.device, generator=g) + skew
        valid = torch.rand(N, device=self.device, generator=g) > 0.1
        d_weight = torch.randn(N, top_k, device=self.device, generator=g)

        def reference(logits, valid):
            routing = runtime_moe.route_top_k(logits, top_k, True)
            return (routing.expert_index, routing.expert_weight,
                    runtime_moe.load_balancing_loss(logits, routing.expert_index, E, valid=valid),
                    runtime_moe.router_z_loss(logits, valid=valid))

        def kernel(logits, valid):
            return moe_router.moe_router(logits, top_k, True, valid)

        record["numerics"] = {}
        for mask in (None, valid):
            label = "ragged" if mask is not None else "all tokens"
            got, want = [], []
            for fn, into in ((kernel, got), (reference, want)):
                leaf = logits.detach().clone().requires_grad_()
                index, weight, balance, z = fn(leaf, mask)
                (weight * d_weight).sum().add(balance).add(0.1 * z).backward()
                into.extend([index, weight.detach(), balance.detach(), z.detach(), leaf.grad])
            record["numerics"][label] = {
                "same_experts": bool(torch.equal(got[0], want[0])),
                **{name: _relative(a, e) for name, a, e in zip(("weight", "load_balancing", "z_loss", "d_logits"),
                                                              got[1:], want[1:], strict=True)}}
        record["numerics"]["ok"] = all(case["same_experts"] and max(v for n, v in case.items() if n != "same_experts")
                                       <= 1e-5 for case in record["numerics"].values())

        for mask, label in ((None, ""), (valid, "ragged_")):
            for name, fn in (("kernel", kernel), ("reference", reference)):
                with torch.no_grad():
                    record[f"{label}{name}_fwd_ms"] = self.time_ms(lambda fn=fn, mask=mask: fn(logits, mask))
                leaf = logits.detach().clone().requires_grad_()

                def train(fn=fn, mask=mask, leaf=leaf):
                    leaf.grad = None
                    _, weight, balance, z = fn(leaf, mask)
                    (weight * d_weight).sum().add(balance).add(z).backward()

                record[f"{label}{name}_fwd_bwd_ms"] = self.time_ms(train)
                record[f"{label}{name}_profile_fwd_bwd"] = self.kernel_profile(train)
            for key in ("fwd", "fwd_bwd"):
                record[f"{label}{key}_speedup"] = record[f"{label}reference_{key}_ms"] / record[f"{label}kernel_{key}_ms"]

    def summary(self) -> str:
        lines = [f"{'figure':70s} {'archgen':>9s} {'ref':>9s} {'ratio':>6s} {'bar':>5s}"]
        for b in self.bars:
            lines.append(f"{b['figure'][:70]:70s} {b['archgen']:9.3f} {b['reference_value']:9.3f} {b['ratio']:6.2f} "
                         f"{b['bar']:5.2f} {'PASS' if b['ratio'] >= b['bar'] else 'miss'}")
        sections = self.results["sections"]
        norm = sections.get("rmsnorm", {})
        for name, figures in norm.items():
            if isinstance(figures, dict) and "fwd_bwd_host_us" in figures:
                graphed = figures.get("fwd_bwd_graphed_ms")
                lines.append(f"rmsnorm {name}: fwd+bwd {figures['fwd_bwd_ms'] * 1e3:.0f} us, host "
                             f"{figures['fwd_bwd_host_us']:.0f} us a call, graphed "
                             f"{graphed * 1e3 if graphed else float('nan'):.0f} us; fwd {figures['fwd_ms'] * 1e3:.0f} us, "
                             f"host {figures['fwd_host_us']:.0f} us")
        for name in ("R128", "R64", "R16", "R8"):
            figures = sections.get("rope", {}).get(name)
            if figures:
                lines.append(f"rope {name}: in place {figures['inference_kernel_in_place_ms']:.4f} ms "
                             f"({figures['inference_speedup']:.2f}x reference, {figures['inference_of_copy']:.2f} of "
                             f"copy); training {figures['training_kernel_ms']:.4f} ms "
                             f"({figures['training_speedup']:.2f}x reference)")
        for placement in norm.get("fwd_placement", []):
            lines.append(f"rmsnorm fwd on x at {placement['x_address_mod_64MB'] >> 20} MB (mod 64): archgen "
                         f"{placement['archgen_ms'] * 1e3:.1f} us, {placement['peer']} {placement['peer_ms'] * 1e3:.1f} us")
        lines += ncu.summary_lines(sections.get("ncu", {}))
        router = sections.get("router", {})
        if "fwd_speedup" in router:
            lines.append(f"router: fwd {router['kernel_fwd_ms']:.4f} ms ({router['fwd_speedup']:.2f}x reference), "
                         f"fwd+bwd {router['kernel_fwd_bwd_ms']:.4f} ms ({router['fwd_bwd_speedup']:.2f}x)")
        for name, record in sections.items():
            for key in ("error", "skipped"):
                if key in record:
                    lines.append(f"{key.upper()} in {name}: {str(record[key])[:200]}")
            numerics = record.get("numerics", {})
            if isinstance(numerics, dict) and numerics.get("ok") is False:
                lines.append(f"NUMERICS FAILED in {name}: {json.dumps(numerics)[:400]}")
        return "\n".join(lines)


def ncu_rmsnorm(device: str) -> list[list]:
    """The launches ncu profiles at the rmsnorm shape, each once after a warm-up: our forward at its default config
    (the H200's choice) and at 4 warps, Liger's forward, our backward (its kernel and the dw sum) at its default
    config, and Liger's backward kernel. Returns [label, launches] in launch order (bench/ncu.py)."""
    kernels_package()
    from archgen_kernels import rmsnorm as rn

    dry_run = device != "cuda"
    R, N = DRY_NORM_SHAPE if dry_run else NORM_SHAPE
    dt = torch.float32 if dry_run else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    x, dy = (torch.randn(R, N, device=device, generator=g).to(dt) for _ in range(2))
    w = (1 + 0.1 * torch.randn(N, device=device, generator=g)).to(dt)
    forward, backward = rn.forward_candidates(N)[0], rn.backward_candidates(N, dt.itemsize)[0]
    launches = {
        f"archgen forward {forward}": (lambda: rn.rms_norm_forward(x, None, w, EPS, forward), 1),
        "archgen forward at 4 warps": (lambda: rn.rms_norm_forward(x, None, w, EPS, {**forward, "num_warps": 4}), 1),
    }
    _, s, rstd = rn.rms_norm_forward(x, None, w, EPS, forward)
    if not dry_run:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        leaves = [x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
        y = LigerRMSNormFunction.apply(*leaves, EPS, 0.0, "llama", False)
        launches["Liger forward"] = (lambda: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False), 1)
    launches[f"archgen backward {backward} (+ dw sum)"] = (
        lambda: rn.rms_norm_backward(dy, None, s, w, rstd, backward), 2)
    if not dry_run:
        launches["Liger backward"] = (lambda: torch.autograd.grad([y], leaves, [dy], retain_graph=True), 1)
    for fn, _ in launches.values():  # compiled and warm before the profiled region
        fn()
    with ncu.profiled(device):
        for fn, _ in launches.values():
            fn()
    return [[label, count] for label, (_, count) in launches.items()]


def _without_grad(fn, args):
    with torch.no_grad():
        return fn(*args)


def _fwd_bwd(fn, args, cotangents):
    """fn(*args) and the gradients of every arg, returned by torch.autograd.grad as a model's activations get theirs:
    accumulated into the leaves' .grad instead, the fused RMSNorm's one ds reaching x and the residual made autograd
    copy it for the second leaf (127 µs of the 0.80 ms call on the H200, Liger's too)."""
    def run():
        out = fn(*args)
        torch.autograd.grad(list(out) if isinstance(out, tuple) else [out], list(args), cotangents)
    return run


def _slug(name: str) -> str:
    """A file-name part for a variant's name: "archgen (through the custom op)" -> "archgen_through_the_custom_op"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; inf where actual has a non-finite element."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not actual.isfinite().all():
        return float("inf")
    return float(f"{float((actual - expected).norm() / expected.norm().clamp_min(1e-30)):.3g}")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench/results")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes: timings meaningless")
    parser.add_argument("--budget-s", type=float, default=110.0, help="stop starting sections after this many seconds")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--ncu", action="store_true", help="then profile the RMSNorm kernels with Nsight Compute")
    parser.add_argument("--ncu-child", help=argparse.SUPPRESS)  # the workload a child under ncu runs (bench/ncu.py)
    args = parser.parse_args()
    if args.ncu_child:
        ncu.child_main({"rmsnorm": ncu_rmsnorm}, args.ncu_child, args.out)
        return
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    bench = Bench(args.out, args.dry_run, args.budget_s)
    for name, needs_s in SECTIONS.items():
        if name in only:
            bench.section(name, getattr(bench, name), 0 if args.dry_run else needs_s)
    if args.ncu:
        bench.section("ncu", bench.ncu, 0 if args.dry_run else NCU_NEEDS_S)
    bench.save()
    print(bench.summary())
    print(f"wrote {args.out / 'norm_rope_router.json'} and {args.out / 'norm_rope_router.bars.json'} in "
          f"{bench.elapsed():.0f}s")


if __name__ == "__main__":
    main()
