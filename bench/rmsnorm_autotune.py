"""Build-time tuning and the fused RMSNorm kernel on the GPU, in one process (issues 10 and 11).

  build     `archgen build bench/specs/bamba_1b.yaml --autotune` into a temporary directory: wall time, the tuning
            table written (kernels/tuning.json), then, in a fresh process as a deployment would, the package imported
            (entries pinned at import, RUNTIME_TUNING off) and one bf16 forward at batch 1 × 512 on the GPU: no tuning
            may happen and no "untuned" warning for a tuned shape.
  numerics  kernels/rmsnorm.py against its float64 reference, fp32 and bf16, plain and with the residual fused, output
            and every gradient (x, residual, weight), odd sizes (777 × 1000, 3 × 5) and the benchmark shape; outputs
            poisoned with NaN first.
  speed     RMSNorm and RMSNorm + residual add at 32768 × 4096 bf16, forward and forward + backward, against the copy
            bandwidth measured in the run (bytes: forward reads x (and the residual) and writes y (and s); backward
            reads dy, s (and ds_out) and writes ds), Liger-Kernel and torch's F.rms_norm; our default (untuned) config
            beside the tuned one.

Writes rmsnorm_autotune.json and rmsnorm_autotune.bars.json ({"figure", "archgen", "unit", "reference",
"reference_value", "ratio", "bar", "device", "date", "command"}; ratio > 1 means archgen is better) under --out.

    python bench/rmsnorm_autotune.py --out "$OUT" --budget-s 60     # on the GPU
    python bench/rmsnorm_autotune.py --dry-run --out /tmp/rms         # CPU: Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from harness import ROOT, Run, bench_ms

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"

import torch  # noqa: E402

from archgen.benchmark import copy_bandwidth, timed  # noqa: E402
from archgen.resources import kernels_package  # noqa: E402

SPEC = "bench/specs/bamba_1b.yaml"
# --dry-run: Bamba at toy widths (it has no tiny preset), as bench/decode.py shrinks it
DRY_OVERRIDES = ("model.d_model=64", "model.vocab_size=256", "model.max_seq_len=32", "mixers.ssm.chunk_size=16",
                 "mixers.ssm.n_heads=2", "mixers.ssm.d_state=16", "mixers.attn.n_heads=4", "mixers.attn.head_dim=16",
                 "mixers.attn.n_kv_heads=2", "mixers.attn.rope.rotary_dim=16", "ffns.mlp.hidden=128")
SHAPE = (32768, 4096)
DRY_SHAPE = (48, 64)
EPS = 1e-6


class Bench(Run):
    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        super().__init__("rmsnorm_autotune", out, dry_run=dry_run, budget_s=budget_s)

    def time_ms(self, fn) -> float:
        """Median milliseconds (triton's do_bench, L2 flushed between runs, on the GPU; the host clock on the CPU)."""
        if self.dry_run:
            return timed(fn, "cpu", 2, warmup=1) * 1e3
        return bench_ms(fn, self.device)

    # -- build --autotune ----------------------------------------------------------------------------------------

    def build(self, record: dict) -> None:
        overrides = [arg for o in DRY_OVERRIDES for arg in ("--set", o)] if self.dry_run else []
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "archgen", "build", SPEC, *overrides, "--autotune", "-o", tmp, "--json"]
            record["command"] = " ".join(command[1:]).replace(tmp, "TMP")
            started = time.perf_counter()
            # leave time for the kernel's own sections; the interpreter on a shared CPU takes what it takes
            timeout = 900.0 if self.dry_run else max(20.0, min(40.0, self.budget_s - self.elapsed() - 30))
            try:
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                record["error"] = f"archgen build --autotune did not finish in {timeout:.0f}s"
                return
            record["build_s"] = round(time.perf_counter() - started, 2)
            record["exit_code"] = done.returncode
            if done.returncode != 0:
                record["error"] = (done.stdout + done.stderr)[-3000:]
                return
            report = json.loads(done.stdout)
            built = report["built"][0]
            record["tuning"] = {k: v for k, v in built.get("tuning", {}).items() if k != "table"}
            record["warnings"] = report.get("warnings", [])
            table_path = Path(built["package"]) / "kernels" / "tuning.json"
            if not table_path.exists():
                record["table"] = None  # the model runs no kernel: nothing to tune
                return
            table = json.loads(table_path.read_text())
            record["table"] = table
            record["entries"] = len(table["entries"])
            record["import_and_run"] = self.import_and_run(Path(tmp), built["package"], table)

    def import_and_run(self, root: Path, package: str, table: dict) -> dict:
        """A fresh process imports the tuned package and runs one forward: what pinned, what tuned (nothing may),
        what warned."""
        name = Path(package).name
        batch, length = (1, 8) if self.dry_run else (1, 512)
        script = textwrap.dedent(f"""
            import json, sys, time, warnings
            sys.path.insert(0, {str(root)!r})
            import torch
            started = time.perf_counter()
            import {name} as package
            kernels = package.model.kernels
            support = kernels.triton_support
            result = {{"import_s": round(time.perf_counter() - started, 2), "runtime_tuning": support.RUNTIME_TUNING,
                       "pinned": sum(len(t.chosen) for t in support.TUNERS.values())}}
            device = {self.device!r}
            with torch.device(device):
                model = package.Model().to(torch.bfloat16)
            tokens = torch.randint(0, 100, ({batch}, {length}), device=device)
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                model(tokens)
            result["untuned"] = [list(k) for k in support.UNTUNED]
            result["warnings"] = [str(w.message)[:300] for w in caught]
            result["tuned_at_run_time"] = {{n: list(t.timings) for n, t in support.TUNERS.items() if t.timings}}
            print(json.dumps(result))
        """)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                  timeout=600 if self.dry_run else 30)
        except subprocess.TimeoutExpired:
            return {"error": "importing the package and one forward took over 30 s"}
        if done.returncode != 0:
            return {"error": (done.stdout + done.stderr)[-3000:]}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        applicable = sum(all(e.get(k) == v for k, v in self._environment().items()) for e in table["entries"])
        result["ok"] = (result["pinned"] >= applicable and not result["tuned_at_run_time"]
                        and result["runtime_tuning"] is False)
        return result

    def _environment(self) -> dict:
        kernels_package()
        from archgen_kernels import triton_support

        return triton_support.environment()

    # -- the kernel ------------------------------------------------------------------------------------------------

    def numerics(self, record: dict) -> None:
        kernels_package()
        from archgen_kernels import rmsnorm as rn

        def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
            g = torch.Generator().manual_seed(seed)
            return (torch.randn(*shape, generator=g) * scale).to(self.device, dtype)

        real = DRY_SHAPE if self.dry_run else SHAPE
        cases = [((3, 5), torch.float32), ((777, 1000), torch.float32), ((777, 1000), torch.bfloat16),
                 (real, torch.bfloat16), (real, torch.float32)]
        if self.dry_run:
            cases = [((3, 5), torch.float32), ((7, 40), torch.float32), (real, torch.float32)]
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
        for (R, N), dtype in cases:
            for fused in (False, True):
                x, res = randn(R, N, dtype=dtype, scale=3.0, seed=1), randn(R, N, dtype=dtype, seed=2)
                w = (1 + 0.1 * randn(N, seed=3))
                dy, ds = randn(R, N, dtype=dtype, seed=4), randn(R, N, dtype=dtype, seed=5)
                errors = self._compare(rn, x, res if fused else None, w, dy, ds if fused else None)
                worst = max(errors.values())
                record[f"{'add_' if fused else ''}rms_norm {R}x{N} {str(dtype)[6:]}"] = {
                    **{k: float(f"{v:.3g}") for k, v in errors.items()}, "ok": worst <= tolerance[dtype]}
        record["ok"] = all(v["ok"] for v in record.values() if isinstance(v, dict))

    def _compare(self, rn, x, res, w, dy, ds) -> dict:
        """Relative norm errors (‖kernel − reference‖ / ‖reference‖, reference in float64) of y, s and every
        gradient; the forward's outputs are poisoned first (the op allocates them: torch.empty filled with NaN)."""
        real_empty = torch.empty

        def poisoned(*args, **kwargs):
            t = real_empty(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        leaves = [t.detach().clone().requires_grad_() for t in (x, res, w) if t is not None]
        rn.torch.empty = poisoned
        try:
            out = rn.add_rms_norm(*leaves[:2], leaves[2], EPS) if res is not None else (rn.rms_norm(*leaves, EPS),)
            torch.autograd.backward(list(out), [dy] if res is None else [dy, ds])
        finally:
            rn.torch.empty = real_empty
        ref_leaves = [t.detach().double().requires_grad_() for t in (x, res, w) if t is not None]
        if res is not None:
            s = ref_leaves[0] + ref_leaves[1]
            ref_out = (rn.rms_norm_reference(s, ref_leaves[2], EPS), s)
        else:
            ref_out = (rn.rms_norm_reference(ref_leaves[0], ref_leaves[1], EPS),)
        torch.autograd.backward(list(ref_out), [dy.double()] if res is None else [dy.double(), ds.double()])
        names = ["y", "s"][:len(out)]
        pairs = [*zip(names, out, ref_out, strict=True),
                 *zip(["dx", "dresidual", "dw"] if res is not None else ["dx", "dw"], [t.grad for t in leaves],
                      [t.grad for t in ref_leaves], strict=True)]
        errors = {}
        for name, got, want in pairs:
            got, want = got.detach().double(), want.detach().double()
            errors[name] = float("inf") if not got.isfinite().all() else float((got - want).norm() / want.norm().clamp_min(1e-30))
        return errors

    def speed(self, record: dict) -> None:
        kernels_package()
        import torch.nn.functional as F

        from archgen_kernels import rmsnorm as rn

        R, N = DRY_SHAPE if self.dry_run else SHAPE
        record["shape"] = [R, N]
        copy = copy_bandwidth(self.device) / 1e12
        record["copy_TBps"] = copy
        dt = torch.bfloat16 if not self.dry_run else torch.float32
        itemsize = torch.finfo(dt).bits // 8
        x = torch.randn(R, N, device=self.device, dtype=dt)
        res = torch.randn(R, N, device=self.device, dtype=dt)
        w = (1 + 0.1 * torch.randn(N, device=self.device)).to(dt)
        dy, ds = torch.randn_like(x), torch.randn_like(x)

        # the kernels' own tuning at this shape, then what the tuners chose and what the untuned default gives
        for fused in (None, res):
            _, s, rstd = rn.rms_norm_forward(x, fused, w, EPS)
            rn.rms_norm_backward(dy, ds if fused is not None else None, s, w, rstd)
        record["chosen"] = {"forward": dict(rn.FORWARD_TUNER.chosen), "backward": dict(rn.BACKWARD_TUNER.chosen)}
        record["tuner_timings_ms"] = {"forward": dict(rn.FORWARD_TUNER.timings), "backward": dict(rn.BACKWARD_TUNER.timings)}
        default_fwd, default_bwd = rn.forward_candidates(N)[0], rn.backward_candidates(N)[0]
        _, s_plain, rstd_plain = rn.rms_norm_forward(x, None, w, EPS)
        record["default"] = {
            "forward_config": default_fwd, "backward_config": default_bwd,
            "fwd_ms": self.time_ms(lambda: rn.rms_norm_forward(x, None, w, EPS, config=default_fwd)),
            "bwd_ms": self.time_ms(lambda: rn.rms_norm_backward(dy, None, s_plain, w, rstd_plain, config=default_bwd)),
            "tuned_fwd_ms": self.time_ms(lambda: rn.rms_norm_forward(x, None, w, EPS)),
            "tuned_bwd_ms": self.time_ms(lambda: rn.rms_norm_backward(dy, None, s_plain, w, rstd_plain)),
        }

        variants = {"archgen": lambda x, w: rn.rms_norm(x, w, EPS), "F.rms_norm": lambda x, w: F.rms_norm(x, (N,), w, EPS)}
        fused_variants = {"archgen": lambda x, r, w: rn.add_rms_norm(x, r, w, EPS),
                          "eager (x + res, F.rms_norm)": lambda x, r, w: (F.rms_norm(x + r, (N,), w, EPS), x + r)}
        try:
            import liger_kernel
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            record["liger_version"] = getattr(liger_kernel, "__version__", "?")
            variants["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
            fused_variants["liger"] = lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)
        except Exception as error:  # noqa: BLE001 - Liger missing (the CPU) is recorded, the rest still runs
            record["liger_import"] = f"{type(error).__name__}: {error}"[:300]

        leaves = {name: t.detach().clone().requires_grad_() for name, t in (("x", x), ("res", res), ("w", w))}

        def fwd_bwd(fn, args, cotangents):
            def run():
                for t in args:
                    t.grad = None
                out = fn(*args)
                torch.autograd.backward(list(out) if isinstance(out, tuple) else [out], cotangents)
            return run

        element_bytes = R * N * itemsize
        for prefix, table, args, cots, fwd_tensors, total_tensors in (
                ("", variants, (leaves["x"], leaves["w"]), [dy], 2, 5),
                ("add_", fused_variants, (leaves["x"], leaves["res"], leaves["w"]), [dy, ds], 4, 8)):
            for name, fn in table.items():
                try:
                    with torch.no_grad():
                        f = self.time_ms(lambda fn=fn, args=args: fn(*args))
                    b = self.time_ms(fwd_bwd(fn, args, cots))
                    record[prefix + name] = {"fwd_ms": f, "fwd_bwd_ms": b,
                                             "fwd_TBps": fwd_tensors * element_bytes / (f * 1e-3) / 1e12,
                                             "fwd_bwd_TBps": total_tensors * element_bytes / (b * 1e-3) / 1e12}
                except Exception as error:  # noqa: BLE001 - a failing variant is recorded, the others still run
                    record[prefix + name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        for prefix, what in (("", "RMSNorm"), ("add_", "RMSNorm + residual add")):
            ours, liger = record.get(f"{prefix}archgen", {}), record.get(f"{prefix}liger", {})
            for key, label in (("fwd_TBps", "fwd"), ("fwd_bwd_TBps", "fwd+bwd")):
                if key not in ours:
                    continue
                self.bar(f"{what} {label} {R}x{N} {str(dt)[6:]}", ours[key], "TB/s", "copy bandwidth in the run",
                         copy, ours[key] / copy, 0.9)
                if key in liger:
                    self.bar(f"{what} {label} {R}x{N} {str(dt)[6:]} vs Liger", ours[key], "TB/s",
                             f"Liger-Kernel {record.get('liger_version')}", liger[key], ours[key] / liger[key], 1.0)

    def summary(self) -> str:
        lines = [super().summary()]
        build = self.sections.get("build", {})
        if "build_s" in build:
            run = build.get("import_and_run", {})
            lines.append(f"build --autotune: {build['build_s']}s, {build.get('entries', 0)} table entries; package "
                         f"import+run ok={run.get('ok')} untuned={len(run.get('untuned', []))}")
        for name, record in self.sections.items():
            if record.get("ok") is False:
                failed = [k for k, v in record.items() if isinstance(v, dict) and not v.get("ok", True)]
                lines.append(f"NUMERICS FAILED in {name}: {failed}")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench/results")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes: timings meaningless")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop starting sections after this many seconds")
    args = parser.parse_args()
    bench = Bench(args.out, args.dry_run, args.budget_s)
    # estimated seconds each section needs at the least, so a late one is skipped rather than cut off
    bench.section("build", bench.build, 0 if args.dry_run else 20)
    bench.section("numerics", bench.numerics, 0 if args.dry_run else 5)
    bench.section("speed", bench.speed, 0 if args.dry_run else 12)
    print(bench.summary())
    print(f"wrote {args.out / 'rmsnorm_autotune.json'} and {args.out / 'rmsnorm_autotune.bars.json'} in {bench.elapsed():.0f}s")


if __name__ == "__main__":
    main()
