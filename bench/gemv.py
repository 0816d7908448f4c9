"""kernels/gemv.py against cuBLAS at the exact (out, in) shapes of Bamba-1B's and Hymba+'s decoding steps, in one run.

Each shape is timed as a decoding step runs it: replayed from a CUDA graph, over enough distinct weight matrices of
that shape (at least STREAM_BYTES) that no call finds its weight in L2, as no layer of a step does. Per shape:
  cublas     F.linear (what nn.Linear runs today)
  gemv       kernels/gemv.py's linear at the shape's own config (gemv.shape_config: what a package without a tuning
             table runs); `unfolded` the same tile with the session-6 float32 accumulator (FOLD 1), and every config
             of the tuner's space, each timed the same way (`candidates_us`, `best`): the tuner's own timing
             (triton's do_bench, one launch at a time) is dominated by launch overhead at these sizes, so it is not
             what is recorded here
  floor      the weight's bytes over the copy bandwidth measured in the same run (bytes read + written per second:
             a GEMV reads its weight once, so its floor is weight bytes / copy rate)
and for the SwiGLU feed-forward's gate and up pair: cuBLAS's two products plus kernels/silu_mul.py (three launches, as
the feed-forward runs today) against swiglu_linear (one launch). Each step total weighs every shape by how many
times a decoding step multiplies by it; "few rows" repeats the largest shapes at 2 and 4 rows (FEW_ROWS, the most
the generated layers send to the kernel), where the kernel reads a weight tile once for all rows. `attn.qkv` is the
attention's q, k and v projections as one (out, in) matrix, as the step runs them (one launch; see MODELS).
The kernel runs with programmatic dependent launch where triton_support.programmatic_launch says so (off unless
ARCHGEN_PDL=1: it measured slower); with --pdl-ab the shape's own config is also timed with it on (each call of a
replay may then start while the one before finishes: `gemv_pdl_on_us`, and the step total `gemv_pdl_on`), in the
same run.

Writes gemv.json and gemv.bars.json ({"figure", "archgen", "unit", "reference", "reference_value", "ratio", "bar",
"device", "date", "command"}; ratio > 1 means archgen is better: cuBLAS ms ÷ GEMV ms, and GEMV bandwidth ÷ copy
bandwidth against the 0.85 of issue 12) under --out.

    python bench/gemv.py --out "$OUT" --budget-s 60      # on the GPU (about 60 s, first-run tuning included)
    python bench/gemv.py --dry-run --out /tmp/gemv        # CPU: Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from harness import ROOT, Run  # before archgen: it puts this checkout on sys.path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from archgen.benchmark import copy_bandwidth, timed  # noqa: E402
from archgen.resources import kernels_package  # noqa: E402

# {model: {projection: ((out, in), times per decoding step)}}: the specs' linear layers (bench/specs/bamba_1b.yaml:
# 12 Mamba-2 and 4 attention layers, each with a SwiGLU MLP; specs/hymba_plus.yaml: 32 layers of parallel attention
# and Mamba-1 heads with a SwiGLU MLP), gate_up being the MLP's gate and up pair. The counts are the step as the
# generated layers run it since session 8: an attention's q, k and v as one launch (`attn.qkv`, timed here as one
# matrix on the plain kernel; the step's qkv_linear streams the same bytes from three), so q_proj|o_proj counts only
# o_proj and k_proj|v_proj nothing; Mamba-1's dt_proj inside the step kernel (kernels/state_update.py), so none.
# The shapes counted 0 are still timed: what the separate launches would take.
MODELS = {
    "bamba_1b": {"mlp.gate_up": ((5632, 2048), 16), "mlp.down_proj": ((2048, 5632), 16),
                 "mamba2.in_proj": ((8512, 2048), 12), "mamba2.out_proj": ((2048, 4096), 12),
                 "attn.q_proj|o_proj": ((2048, 2048), 4), "attn.k_proj|v_proj": ((1024, 2048), 0),
                 "lm_head": ((32000, 2048), 1), "attn.qkv": ((4096, 2048), 4)},
    "hymba_plus": {"mlp.gate_up": ((5504, 1600), 32), "mlp.down_proj": ((1600, 5504), 32),
                   "mamba.in_proj": ((6400, 1600), 32), "mamba.out_proj": ((1600, 3200), 32),
                   "mamba.x_proj": ((132, 3200), 32), "mamba.dt_proj": ((3200, 100), 0),
                   "attn.q_proj|o_proj": ((1600, 1600), 32), "attn.k_proj|v_proj": ((320, 1600), 0),
                   "lm_head": ((32001, 1600), 1), "attn.qkv": ((2240, 1600), 32)},
}
DRY_MODELS = {"tiny": {"mlp.gate_up": ((48, 40), 2), "mlp.down_proj": ((40, 48), 2), "lm_head": ((100, 40), 1)}}
FEW_ROW_SHAPES = {"bamba_1b": ("mlp.gate_up", "mlp.down_proj"), "tiny": ("mlp.gate_up",)}
STREAM_BYTES = 256 * 2**20  # distinct weights per shape: five times the H200's 50 MiB L2
BANDWIDTH_BAR = 0.85  # issue 12: the decode step's GEMVs at >= 85% of the copy bandwidth


class Bench(Run):
    """The run, one section per model (its shapes, few-row shapes and step totals), written after every shape."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float, pdl_ab: bool = False):
        super().__init__("gemv", out, dry_run=dry_run, budget_s=budget_s)
        self.pdl_ab = pdl_ab
        self.dtype = torch.float32 if dry_run else torch.bfloat16
        kernels_package()
        from archgen_kernels import gemv, silu_mul, triton_support

        self.gemv, self.silu_mul, self.config_name = gemv, silu_mul, triton_support.config_name
        self.triton_support = triton_support
        self.meta.update(pdl=triton_support.programmatic_launch(torch.device(self.device)))
        self.copy_Bps = copy_bandwidth(self.device)
        self.multiprocessors = 1 if dry_run else torch.cuda.get_device_properties(self.device).multi_processor_count
        self.meta.update(dtype=str(self.dtype), stream_bytes=STREAM_BYTES, copy_TBps=round(self.copy_Bps / 1e12, 3))

    def per_call_us(self, fn, calls: int) -> float:
        """Microseconds per call of fn(i) for i in range(calls) (each i a distinct weight): replayed from one CUDA
        graph on the GPU (as a decoding step runs), the host clock on the CPU."""
        def run():
            for i in range(calls):
                fn(i)

        if self.dry_run:
            return timed(run, "cpu", 2, warmup=1) * 1e6 / calls
        from triton.testing import do_bench_cudagraph

        run()  # tuning and compiling happen here, before the capture
        torch.cuda.synchronize()
        return float(do_bench_cudagraph(run, rep=20, return_mode="median")) * 1e3 / calls

    def shape(self, N: int, K: int, rows: int, gated: bool) -> dict:
        """One (out, in) shape at `rows` rows: cuBLAS (plus silu_mul when gated) against the kernel and the floor."""
        element = torch.finfo(self.dtype).bits // 8
        matrices = 2 if gated else 1
        weight_bytes = N * K * element * matrices
        copies = 2 if self.dry_run else max(2, -(-STREAM_BYTES // weight_bytes))
        generator = torch.Generator(device=self.device).manual_seed(N + K)
        weights = [(torch.randn((N, K), generator=generator, device=self.device) / K**0.5).to(self.dtype)
                   for _ in range(copies * matrices)]
        x = torch.randn((rows, K), generator=generator, device=self.device).to(self.dtype)
        gemv, silu_mul = self.gemv, self.silu_mul
        if gated:
            def cublas(i):
                return silu_mul.silu_mul(F.linear(x, weights[2 * i]), F.linear(x, weights[2 * i + 1]))

            def kernel(i, config):
                return gemv.gemv_forward(x, weights[2 * i], up_weight=weights[2 * i + 1], config=config)
        else:
            def cublas(i):
                return F.linear(x, weights[i])

            def kernel(i, config):
                return gemv.gemv_forward(x, weights[i], config=config)
        own = gemv.shape_config(N, K, rows, self.multiprocessors)
        candidates = {"own": own, "unfolded": {**own, "FOLD": 1}}
        if not self.dry_run:  # the interpreter takes seconds per candidate: the dry run checks the plumbing only
            candidates.update((self.config_name(c), c) for c in gemv.CONFIGS if c != own)
        reference = cublas(0).double()
        error = max((kernel(0, c).double() - reference).abs().max().item() for c in candidates.values())
        cublas_us = self.per_call_us(cublas, copies)
        times = {name: self.per_call_us(lambda i, c=c: kernel(i, c), copies) for name, c in candidates.items()}
        best = min(times, key=times.get)
        pdl_on = {}
        if self.pdl_ab:  # the own config again with programmatic launches on (a graph captured anew)
            self.triton_support.set_programmatic_launch(True)
            try:
                on_us = self.per_call_us(lambda i: kernel(i, own), copies)
            finally:
                self.triton_support.set_programmatic_launch(None)
            pdl_on = {"gemv_pdl_on_us": round(on_us, 2), "pdl_on_over_off": round(on_us / times["own"], 3)}
        kernel_us = times["own"]
        floor_us = weight_bytes / self.copy_Bps * 1e6
        return {"rows": rows, "out": N, "in": K, "gated": gated, "weight_MiB": round(weight_bytes / 2**20, 2),
                "distinct_weights": copies, "cublas_us": round(cublas_us, 2), "gemv_us": round(kernel_us, 2),
                "unfolded_us": round(times["unfolded"], 2), "best_us": round(times[best], 2),
                "floor_us": round(floor_us, 2), "speedup": round(cublas_us / kernel_us, 3),
                "gemv_of_copy_bandwidth": round(floor_us / kernel_us, 3),
                "best_of_copy_bandwidth": round(floor_us / times[best], 3),
                "cublas_of_copy_bandwidth": round(floor_us / cublas_us, 3),
                "max_abs_difference": error, "max_abs_cublas": reference.abs().max().item(),
                "config": own, "best": candidates[best],
                "candidates_us": {name: round(us, 2) for name, us in times.items()}, **pdl_on}

    def model(self, record: dict, name: str, shapes: dict) -> None:
        """The section of one model: each of its shapes (a failing one is recorded, the others still run), then the
        decoding step's totals and their bar rows once every shape is timed."""
        record.update(shapes={}, few_rows={})
        for projection, ((N, K), per_step) in shapes.items():
            if not self.dry_run and self.elapsed() > self.budget_s:
                record["skipped"] = f"budget: {self.elapsed():.0f}s spent, --budget-s {self.budget_s:.0f}"
                break
            try:
                record["shapes"][projection] = {**self.shape(N, K, 1, projection.endswith("gate_up")),
                                                "per_step": per_step}
            except Exception as error:  # noqa: BLE001 - a failing shape is recorded, the others still run
                record["shapes"][projection] = {"error": f"{type(error).__name__}: {error}",
                                                "traceback": traceback.format_exc()[-2000:]}
            self.write()
        done = [s for s in record["shapes"].values() if "gemv_us" in s]
        if len(done) == len(shapes):
            variants = ("cublas", "gemv", "unfolded", "best", "floor") + (("gemv_pdl_on",) if self.pdl_ab else ())
            step = {variant: sum(s[f"{variant}_us"] * s["per_step"] for s in done) for variant in variants}
            record["step_us"] = {variant: round(us, 1) for variant, us in step.items()}
            self.bar(f"{name} decode step's linear layers, batch 1 ({self.dtype}): GEMV vs cuBLAS", step["gemv"] / 1e3,
                     "ms", "cuBLAS (F.linear; SwiGLU gate+up as 2 products + silu_mul)", step["cublas"] / 1e3,
                     step["cublas"] / step["gemv"], 1.0)
            self.bar(f"{name} decode step's linear layers, batch 1 ({self.dtype}): GEMV fraction of copy bandwidth",
                     step["gemv"] / 1e3, "ms", "weight bytes / copy bandwidth", step["floor"] / 1e3,
                     step["floor"] / step["gemv"], BANDWIDTH_BAR)
            self.bar(f"{name} decode step's linear layers, batch 1 ({self.dtype}): GEMV (best config of each shape) "
                     "fraction of copy bandwidth", step["best"] / 1e3, "ms", "weight bytes / copy bandwidth",
                     step["floor"] / 1e3, step["floor"] / step["best"], BANDWIDTH_BAR)
        for projection in FEW_ROW_SHAPES.get(name, ()):
            (N, K), _ = shapes[projection]
            for rows in (2, self.gemv.FEW_ROWS):
                if not self.dry_run and self.elapsed() > self.budget_s:
                    break
                try:
                    record["few_rows"][f"{projection}-M{rows}"] = self.shape(N, K, rows, projection.endswith("gate_up"))
                except Exception as error:  # noqa: BLE001 - recorded, the others still run
                    record["few_rows"][f"{projection}-M{rows}"] = {"error": f"{type(error).__name__}: {error}"}
                self.write()

    def summary(self) -> str:
        """Every shape's times and fractions of the copy bandwidth, then the bar rows and any failed section."""
        lines = [f"copy bandwidth {self.meta['copy_TBps']} TB/s"]
        for name, record in self.sections.items():
            if "shapes" not in record:
                continue
            lines.append(f"{name}: step {record.get('step_us')}")
            for projection, s in {**record["shapes"], **record["few_rows"]}.items():
                if "gemv_us" in s:
                    lines.append(f"  {projection:24s} M{s['rows']} {s['out']}x{s['in']}: cuBLAS {s['cublas_us']:7.2f} us "
                                 f"({s['cublas_of_copy_bandwidth']:.2f} of copy)  GEMV {s['gemv_us']:7.2f} us "
                                 f"({s['gemv_of_copy_bandwidth']:.2f}, unfolded {s['unfolded_us']:.2f})  "
                                 f"x{s['speedup']:.2f}  {self.config_name(s['config'])}  best {s['best_us']:.2f} us "
                                 f"({s['best_of_copy_bandwidth']:.2f}) {self.config_name(s['best'])}")
                else:
                    lines.append(f"  {projection}: {s.get('error')}")
        return "\n".join([*lines, super().summary()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench/results")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes: timings meaningless")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop starting shapes after this many seconds")
    parser.add_argument("--only", default=None, help=f"comma-separated models of {', '.join(MODELS)}")
    parser.add_argument("--pdl-ab", action="store_true",
                        help="also time each shape's own config with programmatic dependent launch on")
    args = parser.parse_args()
    bench = Bench(args.out, args.dry_run, args.budget_s, args.pdl_ab)
    for name, shapes in (DRY_MODELS if args.dry_run else MODELS).items():
        if args.dry_run or args.only is None or name in args.only.split(","):
            bench.section(name, lambda record, name=name, shapes=shapes: bench.model(record, name, shapes))
    print(bench.summary())
    print(f"wrote {args.out / 'gemv.json'} and {args.out / 'gemv.bars.json'} in {bench.elapsed():.0f}s")


if __name__ == "__main__":
    main()
