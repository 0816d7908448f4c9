"""The Triton selective scan (kernels/selective_scan.py) on one GPU, in one run, written to one JSON file.

  1. mamba_ssm: its CUDA selective_scan_fn (built from the sdist in .whl/) against the kernel at the anchor shape
     below: forward and forward+backward of each, the peer timed first, every gradient compared with the peer's, and
     both figures in bars.json form (ratio = mamba_ssm's ms / archgen's, bar 1.0). The kernel is tuned before the
     peer is loaded, so that its tuning overlaps a background `--build-peer`.
  2. backward_configs: every backward config of the autotune space, launched explicitly, against the reference (bf16,
     at the anchor's specialisations, so nothing compiles twice): each candidate's gradients checked, not only the
     tuner's pick; then every forward config's y and final state.
  3. chunk_sizes: the checkpoint interval (CHUNK_SIZES; 8 ran slower than 4 in gpu8/call2) at the anchor shape:
     forward (with checkpoints) and forward+backward of each, tuned per chunk; fewer steps recomputed by the backward
     against more checkpoint bytes; every forward config's inference and training times.
  4. segments: the backward at batches 1 and 2, where one warp per 32 channels leaves the GPU idle, with its time
     split into 1 to 16 segments run in parallel and with the automatic count: times and gradients in one run.
  5. correctness: forward and every gradient against the sequential reference (selective_scan_reference) at
     realistic shapes, float32 and bfloat16 kernels on the same input values (the bf16-rounded ones), the reference
     in float32; max abs and max relative (to the reference's largest magnitude) errors, and a verdict per tensor.
  6. autotune: the Mamba-1 widths of the seed specs (D = expand · d_model for their tiny and full presets, read from
     specs/*.yaml; N = d_state = 16) plus the anchor's, bf16; the winning configs and the autotuner's timings.
  7. anchor: batch 8, 4096 channels, L = 4096, d_state 16, bf16 u/Δ/z/B/C, z gate, Δ bias + softplus (and D, as the
     Mamba block has it): forward (inference, and training with checkpoints) and forward+backward, each against its
     floor — the bytes it must move (u, Δ, z, B, C read and y written; the backward's inputs and gradients) over
     the device copy bandwidth measured here (a 2 GiB copy_); every autotune config's time.
  8. reference path: templates/runtime/ssm.py's selective_scan (what generated packages run today) at batch 1,
     L = 2048, D = 4096, where it fits in memory, against the kernel at the same shape.

With --ncu, after the sections: Nsight Compute (bench/ncu.py) on one forward (with checkpoints) and one backward
launch at the anchor shape for each chunk size of CHUNK_SIZES, tuned first in the child: time, DRAM bytes,
occupancy, registers, instructions and the stall reasons per launch in the JSON, ncu's tables in ncu/scan.ncu.txt.

Every section records its own error and the run goes on; the JSON is rewritten after each section, so a run cut
short keeps what it measured. The sections stop starting once --budget-s seconds have passed (default 330: the run
must end within 6 minutes on an H100).

Run from the repository root on a GPU machine:   python bench/selective_scan_kernel.py --out bench/results/kernels.json
The peer's build takes minutes; start it in the background first (it fills torch's extension cache, where the
mamba_ssm section waits for it): python bench/selective_scan_kernel.py --build-peer --out /tmp/peer_build.json &
                                 python bench/selective_scan_kernel.py --only mamba_ssm,anchor --out $OUT
archgen's kernel alone at the anchor shape:     python bench/selective_scan_kernel.py --only anchor --out $OUT
Chunk sizes, then Nsight Compute's view:        python bench/selective_scan_kernel.py --only chunk_sizes --ncu --out $OUT
Exercise the code path on a CPU (Triton's interpreter, tiny shapes, timings meaningless):
                                                python bench/selective_scan_kernel.py --dry-run --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import ncu  # bench/ncu.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("specs/hns_ss_jepa_moe.yaml", "specs/hymba_plus.yaml", "specs/nexus.yaml")
CHUNK_SIZES = (4,)
"""The chunk sizes the chunk_sizes section times (each tunes both kernels: a compile per config) and ncu profiles."""
NCU_NEEDS_S = 45
"""What the ncu section needs: a child process that tunes both kernels per chunk size (compiled already by the earlier
sections, in Triton's cache), then ncu replaying each of the four launches once per section."""


def load_module(name: str, relative_path: str):
    """Import a file of this checkout by path (templates/runtime/ is no package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Bench:
    """Shared state of one run: the modules, the device, the timer, the deadline, the results being written."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        import torch

        self.torch = torch
        self.out = out
        self.dry_run = dry_run
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.device = "cpu" if dry_run else "cuda"
        sys.path.insert(0, str(ROOT))
        from archgen.resources import kernels_package

        kernels_package()  # this checkout's kernels/ as archgen_kernels
        from archgen_kernels import selective_scan

        self.ss = selective_scan
        self.ssm = load_module("archgen_runtime_ssm", "templates/runtime/ssm.py")
        self.results: dict = {}

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def section(self, name: str, fn, *, needs_s: float = 0.0) -> None:
        """Run one section; its result or its error goes under results[name]; the JSON is rewritten after it."""
        if self.elapsed() + needs_s > self.budget_s:
            self.results[name] = {"skipped": f"time budget: {self.elapsed():.0f} s of {self.budget_s:.0f} s used"}
        else:
            started = time.perf_counter()
            try:
                self.results[name] = fn()
            except Exception as error:  # a section's failure is a result; the others still run
                self.results[name] = {"error": f"{type(error).__name__}: {error}",
                                      "traceback": traceback.format_exc().splitlines()[-12:]}
            if isinstance(self.results[name], dict):
                self.results[name]["section_s"] = round(time.perf_counter() - started, 2)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.write()
        print(f"[{self.elapsed():6.1f} s] {name}: {json.dumps(self.results[name], default=str)[:400]}", flush=True)

    # -- measuring ----------------------------------------------------------------------------------------------

    def time_ms(self, fn, grad_to_none=None) -> float:
        """Median milliseconds of fn: triton.testing.do_bench on the GPU, a few wall-clock runs in the dry run."""
        if self.device == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - started) * 1e3)
        return statistics.median(runs)

    def inputs(self, batch, seqlen, dim, dstate, dtype, *, seed=0, initial_state=False):
        """Mamba-like inputs (Δ = softplus(delta + bias) around 0.3, A = -exp(·) in [-16, -1]): u, Δ, z, B, C in
        `dtype`, A, D, delta_bias (and the initial state) in float32, as the Mamba block passes them."""
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*shape, scale=1.0, mean=0.0, dt=torch.float32):
            return (torch.randn(*shape, generator=g, device=self.device) * scale + mean).to(dt)

        args = dict(
            u=randn(batch, seqlen, dim, dt=dtype),
            delta=randn(batch, seqlen, dim, scale=0.5, mean=-1.0, dt=dtype),
            A=-torch.exp(torch.rand(dim, dstate, generator=g, device=self.device) * 2.772588722239781),
            B=randn(batch, seqlen, dstate, dt=dtype),
            C=randn(batch, seqlen, dstate, dt=dtype),
            D=randn(dim),
            z=randn(batch, seqlen, dim, dt=dtype),
            delta_bias=randn(dim, scale=0.5),
        )
        if initial_state:
            args["initial_state"] = randn(batch, dim, dstate)
        return args

    # -- sections -------------------------------------------------------------------------------------------------

    def copy_bandwidth(self) -> dict:
        """Bytes read + written per second by a device copy of 2 GiB (64 MiB in the dry run)."""
        torch = self.torch
        numel = 2**30 if self.device == "cuda" else 2**25
        src = torch.empty(numel, dtype=torch.bfloat16, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        moved = 2 * numel * src.element_size()
        self.bandwidth = moved / (ms / 1e3)
        return {"bytes_moved": moved, "ms": ms, "bytes_per_s": self.bandwidth}

    def correctness(self) -> dict:
        torch = self.torch
        ss = self.ss
        shapes = [(1, 21, 6, 4)] if self.dry_run else [(2, 1000, 1000, 16), (1, 2048, 3200, 16)]
        tolerance = {"float32": {"forward": 1e-4, "gradients": 1e-3}, "bfloat16": {"forward": 3e-2, "gradients": 3e-2}}
        report = {"tolerance_relative_to_max": tolerance, "reference": "selective_scan_reference in float32 on the "
                  "bf16-rounded inputs; both kernels get those same values", "shapes": {}}
        all_ok = True
        for batch, seqlen, dim, dstate in shapes:
            key = f"B{batch}-T{seqlen}-D{dim}-N{dstate}"
            base = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=1, initial_state=True)
            as_f32 = {k: v.float() for k, v in base.items()}
            g = torch.Generator(device=self.device).manual_seed(2)
            grad_y = torch.randn(batch, seqlen, dim, generator=g, device=self.device)
            grad_state = torch.randn(batch, dim, dstate, generator=g, device=self.device)
            ref = _forward_backward(ss.selective_scan_reference, as_f32, grad_y, grad_state)
            entry = {}
            for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                self.pin_unless_tuned(dim, dstate, dtype)
                kernel_args = {k: (v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v) for k, v in as_f32.items()}
                got = _forward_backward(ss.selective_scan, kernel_args, grad_y, grad_state)
                errors = {}
                for name, value in got.items():
                    kind = "forward" if name in ("y", "final_state") else "gradients"
                    err = _errors(value, ref[name])
                    err["ok"] = err["max_rel"] <= tolerance[label][kind]
                    all_ok &= err["ok"]
                    errors[name] = err
                entry[label] = errors
            report["shapes"][key] = entry
            del ref, got, base, as_f32
        report["ok"] = all_ok
        report["configs"] = self.ss.tuned_configs()
        return report

    def backward_configs(self) -> dict:
        """Every backward config of the autotune space against the reference, each launched explicitly: whichever the
        tuner picks, each candidate's gradients are checked on this GPU; then every forward config's y and final
        state. The shape shares the anchor's specialisations (bf16; T, D and T / chunk multiples of 16; no initial
        state, no gradient of the final state), so the anchor's compiled kernels serve: nothing is compiled twice.
        Ragged lengths and initial states are the CPU tests' (tests/kernels/test_selective_scan.py)."""
        torch = self.torch
        ss = self.ss
        # T = 512: its chunks and their shares of 4 or 8 segments are multiples of 16, like the anchor's (Triton
        # specialises integer arguments on that).
        batch, seqlen, dim, dstate = (1, 32, 8, 4) if self.dry_run else (2, 512, 512, 16)
        args = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=7)
        g = torch.Generator(device=self.device).manual_seed(8)
        dy = torch.randn(batch, seqlen, dim, generator=g, device=self.device).to(torch.bfloat16)
        no_state_gradient = torch.zeros(batch, dim, dstate, device=self.device)
        ref = _forward_backward(ss.selective_scan_reference, {k: v.float() for k, v in args.items()}, dy.float(),
                                no_state_gradient)
        positional = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        _, _, checkpoints = ss.selective_scan_forward(*positional, True, None, save_checkpoints=True)
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
        report = {"shape": [batch, seqlen, dim, dstate], "dtype": "bfloat16", "tolerance_relative_to_max": 3e-2,
                  "configs": {}, "forward_configs": {}}
        backward_kernels = (ss._selective_scan_bwd_kernel, ss._selective_scan_bwd_carry_kernel)
        for config in ss.BACKWARD_CONFIGS:
            compiled_before = _compiled(backward_kernels)
            grads = ss.selective_scan_backward(dy, None, *positional, True, None, checkpoints, config=config)
            errors = {f"d{name}": _errors(grad.float(), ref[f"d{name}"])["max_rel"]
                      for name, grad in zip(names, grads, strict=True) if grad is not None}
            report["configs"][",".join(f"{k}={v}" for k, v in config.items())] = {
                "max_rel": errors, "ok": all(err <= 3e-2 for err in errors.values()),
                "registers": _registers(_compiled(backward_kernels) - compiled_before)}
        forward_kernels = (ss._selective_scan_fwd_kernel, ss._selective_scan_fwd_steps_kernel)
        for config in ss.FORWARD_CONFIGS:
            compiled_before = _compiled(forward_kernels)
            y, final_state, _ = ss.selective_scan_forward(*positional, True, None, config=config)
            errors = {"y": _errors(y.float(), ref["y"])["max_rel"],
                      "final_state": _errors(final_state, ref["final_state"])["max_rel"]}
            report["forward_configs"][",".join(f"{k}={v}" for k, v in config.items())] = {
                "max_rel": errors, "ok": all(err <= 3e-2 for err in errors.values()),
                "registers": _registers(_compiled(forward_kernels) - compiled_before)}
        report["ok"] = all(entry["ok"] for group in ("configs", "forward_configs") for entry in report[group].values())
        return report

    def pin_unless_tuned(self, dim, dstate, dtype) -> None:
        """Compiling every candidate config takes a second or two each: only bf16 at a width that is a multiple of
        16 (the specialisation every seed width shares) is tuned here; other checks run one fixed config."""
        torch = self.torch
        if dtype == torch.bfloat16 and dim % 16 == 0:
            return
        key = self.ss.shape_key(dim, dstate, self.ss.CHUNK_SIZE, dtype)
        training = self.ss.shape_key(dim, dstate, self.ss.CHUNK_SIZE, dtype, checkpoints=True)
        self.ss.pin_configs({"forward": {key: self.ss.FORWARD_DEFAULT, training: self.ss.FORWARD_DEFAULT},
                             "backward": {key: self.ss.BACKWARD_DEFAULT}})

    def seed_widths(self) -> dict:
        """{spec: {preset: (d_inner, d_state)}}: the A_log shape of the Mamba-1 mixers in each seed spec's IR."""
        sys.path.insert(0, str(ROOT))
        from archgen.pipeline import compile_spec

        widths = {}
        for spec in SPECS:
            for preset in ("tiny", None):
                for op in compile_spec(ROOT / spec, preset).ir.ops():
                    if op.kind == "mamba":
                        widths.setdefault(spec, {})[preset or "default"] = op.params["A_log"]
        return widths

    def autotune(self) -> dict:
        ss = self.ss
        widths = self.seed_widths()
        shapes = sorted({w for presets in widths.values() for w in presets.values()} | {(4096, 16)})
        report = {"seed_widths": widths, "by_width": {}}
        if self.dry_run:  # the interpreter tunes nothing: one tiny width walks the code path
            report["note"] = f"dry run: the interpreter runs INTERPRETER_CONFIG {ss.INTERPRETER_CONFIG}, widths not tuned"
            shapes, batch, seqlen = [(8, 4)], 1, 20
        else:
            batch, seqlen = 8, 2048
        for dim, dstate in shapes:
            report["by_width"][f"D{dim}-N{dstate}"] = self.tune_width(dim, dstate, batch=batch, seqlen=seqlen)
        report["tuned_configs"] = ss.tuned_configs()
        return report

    def tune_width(self, dim: int, dstate: int, batch: int, seqlen: int) -> dict:
        """One training step at this width tunes both kernels (unless an earlier section did); then the forward's
        time at the tuning shape."""
        torch = self.torch
        ss = self.ss
        # With an initial state, like the correctness checks: the same compiled variant, so nothing new to compile.
        args = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=3, initial_state=True)
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
        started = time.perf_counter()
        y, _ = ss.selective_scan(**leaves)  # the training forward: tunes the forward kernel
        y.backward(torch.ones_like(y))  # tunes the backward kernel
        if self.device == "cuda":
            torch.cuda.synchronize()
        key = ss.shape_key(dim, dstate, ss.CHUNK_SIZE, torch.bfloat16)
        training = ss.shape_key(dim, dstate, ss.CHUNK_SIZE, torch.bfloat16, checkpoints=True)
        entry = {"tuning_s": round(time.perf_counter() - started, 2), "key": key,
                 "forward_training": _tuner_report(ss.FORWARD_TUNER, training),
                 "backward": _tuner_report(ss.BACKWARD_TUNER, key)}
        with torch.no_grad():
            entry[f"forward_ms_at_B{batch}_T{seqlen}"] = self.time_ms(lambda: ss.selective_scan(**args))
        entry["forward"] = _tuner_report(ss.FORWARD_TUNER, key)
        return entry

    def anchor(self) -> dict:
        torch = self.torch
        ss = self.ss
        batch, seqlen, dim, dstate = (1, 40, 8, 4) if self.dry_run else (8, 4096, 4096, 16)
        args = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=4)
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
        grad_y = torch.randn(batch, seqlen, dim, device=self.device, dtype=torch.bfloat16)
        elem = 2  # bytes of a bf16 element
        tokens = batch * seqlen
        forward_bytes = elem * tokens * (3 * dim + 2 * dstate) + elem * tokens * dim  # u, Δ, z, B, C in; y out
        backward_bytes = elem * tokens * (4 * dim + 2 * dstate) + elem * tokens * (3 * dim + 2 * dstate)  # + dy; grads out
        with torch.no_grad():
            ss.selective_scan(**args)  # warm-up (and autotune, if the width was not tuned yet)
            infer_ms = self.time_ms(lambda: ss.selective_scan(**args))
        train_forward_ms = self.time_ms(lambda: ss.selective_scan(**leaves))

        def forward_backward():
            y, _ = ss.selective_scan(**leaves)
            y.backward(grad_y)

        forward_backward()
        fwd_bwd_ms = self.time_ms(forward_backward, grad_to_none=list(leaves.values()))
        forward_floor_ms = forward_bytes / self.bandwidth * 1e3
        fwd_bwd_floor_ms = (forward_bytes + backward_bytes) / self.bandwidth * 1e3
        return {
            "shape": {"batch": batch, "seqlen": seqlen, "dim": dim, "dstate": dstate, "dtype": "bfloat16",
                      "features": ["z gate", "delta_bias + softplus", "D skip"], "chunk_size": ss.CHUNK_SIZE},
            "forward_inference_ms": infer_ms,
            "forward_training_ms": train_forward_ms,
            "forward_backward_ms": fwd_bwd_ms,
            "forward_floor_bytes": forward_bytes,
            "forward_floor_ms": forward_floor_ms,
            "forward_backward_floor_bytes": forward_bytes + backward_bytes,
            "forward_backward_floor_ms": fwd_bwd_floor_ms,
            "checkpoint_bytes": 4 * batch * -(-seqlen // ss.CHUNK_SIZE) * dim * dstate,
            "exp2_evaluations_forward": batch * seqlen * dim * dstate,
            "ratio_forward_inference_over_floor": infer_ms / forward_floor_ms,
            "ratio_forward_training_over_floor": train_forward_ms / forward_floor_ms,
            "ratio_forward_backward_over_floor": fwd_bwd_ms / fwd_bwd_floor_ms,
            "tokens_per_s_forward_inference": tokens / (infer_ms / 1e3),
            "configs": ss.tuned_configs(),
            "tuner_timings_ms": _tuner_timings(ss, dim, dstate, ss.CHUNK_SIZE, torch.bfloat16),
            "note": "floors count only the bytes of the inputs and outputs over the measured copy bandwidth; the "
                    "kernels also evaluate one exp2 per (token, channel, state) forward and 3.5 (SUB 4) to 5.5 (SUB 2) "
                    "backward, where the forward is recomputed piecewise from the chunk checkpoints, which the "
                    "special-function units bound too (16 per clock per SM on H100)",
        }

    def chunk_sizes(self) -> dict:
        """The checkpoint interval (chunk_size) at the anchor shape: the backward recomputes each piece's states from
        the chunk's checkpoint, so shorter chunks recompute fewer steps and move more checkpoint bytes (4·N/chunk per
        element of u, written by the forward and read by the backward). Forward (inference; training, with checkpoints)
        and forward+backward for each, tuned per chunk (the tuners' keys hold it), with every config's time."""
        torch = self.torch
        ss = self.ss
        batch, seqlen, dim, dstate = (1, 40, 8, 4) if self.dry_run else (8, 4096, 4096, 16)
        args = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=4)
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
        grad_y = torch.randn(batch, seqlen, dim, device=self.device, dtype=torch.bfloat16)
        report = {"shape": [batch, seqlen, dim, dstate], "dtype": "bfloat16", "default_chunk_size": ss.CHUNK_SIZE,
                  "chunks": {}}
        for chunk in CHUNK_SIZES:

            def forward_backward(chunk=chunk):
                ss.selective_scan(**leaves, chunk_size=chunk)[0].backward(grad_y)

            forward_backward()  # tunes both kernels for this chunk
            with torch.no_grad():
                inference_ms = self.time_ms(lambda chunk=chunk: ss.selective_scan(**args, chunk_size=chunk))
            report["chunks"][chunk] = {
                "forward_inference_ms": inference_ms,
                "forward_training_ms": self.time_ms(lambda chunk=chunk: ss.selective_scan(**leaves, chunk_size=chunk)),
                "forward_backward_ms": self.time_ms(forward_backward, grad_to_none=list(leaves.values())),
                "checkpoint_bytes": 4 * batch * -(-seqlen // chunk) * dim * dstate,
                "tuner_timings_ms": _tuner_timings(ss, dim, dstate, chunk, torch.bfloat16),
                "configs": ss.tuned_configs(),
                "forward_config_ms": self.forward_config_ms(args, chunk),
            }
            self.results["chunk_sizes"] = dict(report, partial=f"chunk {chunk} done")
            self.write()
        fastest = min(report["chunks"], key=lambda c: report["chunks"][c]["forward_backward_ms"])
        report["fastest_chunk_size"] = fastest
        report["speedup_fastest_over_default"] = (report["chunks"][ss.CHUNK_SIZE]["forward_backward_ms"]
                                                  / report["chunks"][fastest]["forward_backward_ms"])
        return report

    def forward_config_ms(self, args: dict, chunk: int) -> dict:
        """Every forward config's inference and training (checkpoint-writing) time: the tuner sees only the first
        call's kind, and the bar is the inference forward's."""
        ss = self.ss
        positional = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        times = {}
        for config in ss.FORWARD_CONFIGS:
            times[",".join(f"{k}={v}" for k, v in config.items())] = {
                kind: self.time_ms(lambda config=config, save=save: ss.selective_scan_forward(
                    *positional, True, None, save_checkpoints=save, chunk_size=chunk, config=config))
                for kind, save in (("inference", False), ("training", True))}
        return times

    def segments(self) -> dict:
        """The backward where the batch is too small for one warp per 32 channels to fill the GPU (batch 1: 128 warps
        at D 4096, 100 at Hymba+'s 3200 against 1056 the H200 holds): time split into segments run in parallel, each
        from the adjoint a pre-pass carries to its right end. Per shape, the tuned-for-the-anchor config with 1, 2, 4, 8
        and 16 segments and with the automatic count (`_segments_to_fill`), one run, every gradient against the
        unsegmented one's."""
        torch = self.torch
        ss = self.ss
        shapes = [(1, 40, 8, 4)] if self.dry_run else [(1, 4096, 4096, 16), (1, 2048, 3200, 16), (2, 4096, 4096, 16)]
        names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")
        report = {"dtype": "bfloat16", "base_config": ss.BACKWARD_DEFAULT, "shapes": {}}
        for batch, seqlen, dim, dstate in shapes:
            args = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=5)
            positional = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
            dy = torch.randn(batch, seqlen, dim, device=self.device, dtype=torch.bfloat16)
            _, _, checkpoints = ss.selective_scan_forward(*positional, True, None, save_checkpoints=True)

            def backward(config, positional=positional, dy=dy, checkpoints=checkpoints):
                return ss.selective_scan_backward(dy, None, *positional, True, None, checkpoints, config=config)

            whole = backward(ss.BACKWARD_DEFAULT | {"SEGMENTS": 1})
            warps = batch * -(-dim // ss.BACKWARD_DEFAULT["BLOCK_D"]) * ss.BACKWARD_DEFAULT["num_warps"]
            entry = {"grid_warps": warps, "automatic_segments": ss._segments_to_fill(torch.device(self.device), warps),
                     "backward_ms": {}, "max_rel_against_unsegmented": {}}
            for segments in (1, 2, 4, 8, 16, "automatic"):
                config = dict(ss.BACKWARD_DEFAULT) if segments == "automatic" else ss.BACKWARD_DEFAULT | {"SEGMENTS": segments}
                grads = backward(config)
                entry["max_rel_against_unsegmented"][segments] = {
                    name: _errors(got.float(), want.float())["max_rel"]
                    for name, got, want in zip(names, grads[:len(names)], whole[:len(names)], strict=True)}
                entry["backward_ms"][segments] = self.time_ms(lambda config=config: backward(config))
            fastest = min(entry["backward_ms"], key=entry["backward_ms"].get)
            entry["fastest"] = fastest
            entry["speedup_automatic_over_unsegmented"] = entry["backward_ms"][1] / entry["backward_ms"]["automatic"]
            report["shapes"][f"B{batch}-L{seqlen}-D{dim}-N{dstate}"] = entry
            self.results["segments"] = dict(report, partial=f"B{batch} L{seqlen} D{dim} done")
            self.write()
            del args, positional, dy, checkpoints, whole
        return report

    def ncu(self) -> dict:
        """Nsight Compute on the kernels' launches of `ncu_scan`; a dry run only runs that workload."""
        if self.dry_run:
            return {"variants": ncu_scan(self.device)}
        record = ncu.profile(Path(__file__), "scan", "_selective_scan_", self.out.parent / "ncu",
                             timeout_s=max(self.budget_s - self.elapsed(), NCU_NEEDS_S))
        record["summary"] = ncu.summary_lines(record)
        return record

    def reference_path(self) -> dict:
        torch = self.torch
        ss, ssm = self.ss, self.ssm
        batch, seqlen, dim, dstate = (1, 20, 8, 4) if self.dry_run else (1, 2048, 4096, 16)
        args = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=5)
        grad_y = torch.randn(batch, seqlen, dim, device=self.device, dtype=torch.bfloat16)
        report = {"shape": {"batch": batch, "seqlen": seqlen, "dim": dim, "dstate": dstate, "dtype": "bfloat16"}}
        for label, fn in (("kernel", ss.selective_scan), ("reference", ssm.selective_scan)):
            try:
                report.update({f"{label}_{k}": v for k, v in self.time_scan(fn, args, grad_y).items()})
            except Exception as error:  # the reference may not fit; say so and keep the kernel's numbers
                report[f"{label}_error"] = f"{type(error).__name__}: {error}"
            if self.device == "cuda":
                torch.cuda.empty_cache()
        for phase in ("forward", "forward_backward"):
            if f"reference_{phase}_ms" in report and f"kernel_{phase}_ms" in report:
                report[f"speedup_{phase}_kernel_over_reference"] = report[f"reference_{phase}_ms"] / report[f"kernel_{phase}_ms"]
        return report

    def time_scan(self, fn, args: dict, grad_y) -> dict:
        """fn(**args) -> (y, final_state): forward ms (no grad), forward+backward ms, and that step's peak memory."""
        torch = self.torch
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}

        def forward_backward():
            y, _ = fn(**leaves)
            y.backward(grad_y)

        with torch.no_grad():
            result = {"forward_ms": self.time_ms(lambda: fn(**args))}
        result["forward_backward_ms"] = self.time_ms(forward_backward, grad_to_none=list(leaves.values()))
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            forward_backward()
            result["forward_backward_peak_bytes"] = torch.cuda.max_memory_allocated()
        return result

    def mamba_ssm(self) -> dict:
        """mamba_ssm's CUDA selective_scan_fn against the kernel at the anchor shape, the peer timed first. The kernel
        is tuned (one training step) before the peer is loaded, so that its tuning overlaps the peer's build when
        `--build-peer` runs in the background (loading then waits for that build)."""
        torch = self.torch
        ss = self.ss
        batch, seqlen, dim, dstate = (1, 40, 8, 4) if self.dry_run else (8, 4096, 4096, 16)
        args = self.inputs(batch, seqlen, dim, dstate, torch.bfloat16, seed=6)
        grad_y = torch.randn(batch, seqlen, dim, device=self.device, dtype=torch.bfloat16)
        ours_leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}

        def ours_fwd_bwd():
            ss.selective_scan(**ours_leaves)[0].backward(grad_y)

        ours_fwd_bwd()  # tunes both kernels at this width unless an earlier section did
        if self.dry_run:
            return {"skipped": "dry run: the kernel's step ran; mamba_ssm's CUDA extension needs a GPU"}
        torch.cuda.synchronize()

        wheels = sorted(p.name for p in (ROOT / ".whl").glob("mamba_ssm*")) if (ROOT / ".whl").is_dir() else []
        build = {}
        try:
            sdists = sorted((ROOT / ".whl").glob("mamba_ssm-*.tar.gz"))
            if sdists:
                build = _load_mamba_ssm_from_sdist(sdists[-1])
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as error:
            return {"skipped": f"mamba_ssm not importable ({type(error).__name__}: {error}); in .whl/: {wheels or 'none'}",
                    "build": build}
        # mamba_ssm takes channels-first u, delta, z (B, D, L) and B, C (B, N, L); the transposes are not timed.
        channels_first = ("u", "delta", "z", "B", "C")
        cf = {k: (v.transpose(1, 2).contiguous() if k in channels_first else v) for k, v in args.items()}
        theirs_leaves = {k: v.detach().clone().requires_grad_() for k, v in cf.items()}
        grad_y_cf = grad_y.transpose(1, 2).contiguous()

        def theirs_fn(u, delta, A, B, C, D, z, delta_bias):
            return selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)

        def theirs_fwd_bwd():
            theirs_fn(**theirs_leaves).backward(grad_y_cf)

        result = {"shape": [batch, seqlen, dim, dstate], "dtype": "bfloat16", "build": build}
        with torch.no_grad():
            result["mamba_ssm_forward_ms"] = self.time_ms(lambda: theirs_fn(**cf))
        theirs_fwd_bwd()
        result["mamba_ssm_forward_backward_ms"] = self.time_ms(theirs_fwd_bwd,
                                                               grad_to_none=list(theirs_leaves.values()))
        self.results["mamba_ssm"] = dict(result, partial="the peer's times; the kernel's follow")
        self.write()  # the peer's figures survive whatever follows

        with torch.no_grad():
            result["kernel_forward_ms"] = self.time_ms(lambda: ss.selective_scan(**args))
            y_ours, _ = ss.selective_scan(**args)
            y_theirs = theirs_fn(**cf).transpose(1, 2)
        result["kernel_forward_backward_ms"] = self.time_ms(ours_fwd_bwd, grad_to_none=list(ours_leaves.values()))
        result["ratio_kernel_over_mamba_ssm_forward"] = result["kernel_forward_ms"] / result["mamba_ssm_forward_ms"]
        result["ratio_kernel_over_mamba_ssm_forward_backward"] = (result["kernel_forward_backward_ms"]
                                                                  / result["mamba_ssm_forward_backward_ms"])
        result["outputs_relative_difference"] = _errors(y_ours.float(), y_theirs.float())["max_rel"]
        result["configs"] = ss.tuned_configs()

        # Every gradient of one step against mamba_ssm's (an independent implementation) at this shape.
        for leaf in (*ours_leaves.values(), *theirs_leaves.values()):
            leaf.grad = None
        ours_fwd_bwd()
        theirs_fwd_bwd()
        gradients = {}
        for name in args:
            theirs_grad = theirs_leaves[name].grad
            theirs_grad = theirs_grad.transpose(1, 2) if name in channels_first else theirs_grad
            gradients[f"d{name}"] = _errors(ours_leaves[name].grad.float(), theirs_grad.float())["max_rel"]
        result["gradients_relative_difference"] = gradients
        result["numerics_ok"] = (result["outputs_relative_difference"] <= 3e-2
                                 and all(err <= 3e-2 for err in gradients.values()))
        result["bars"] = [self.bar_entry(f"Mamba-1 selective scan {phase} (B8 L4096 D4096 N16 bf16)",
                                         result[f"kernel_{phase.replace('+', '_')}_ms"],
                                         result[f"mamba_ssm_{phase.replace('+', '_')}_ms"])
                          for phase in ("forward", "forward+backward")]
        return result

    def bar_entry(self, figure: str, archgen_ms: float, reference_ms: float) -> dict:
        """One figure in bench/results/bars.json's format: ratio = mamba_ssm's time / archgen's (above 1: archgen
        faster), bar 1.0 (issue 10: at least as fast as selective_scan_fn)."""
        return {"figure": figure, "archgen": archgen_ms, "unit": "ms", "reference": "mamba_ssm selective_scan_fn (CUDA)",
                "reference_value": reference_ms, "ratio": reference_ms / archgen_ms, "bar": 1.0,
                "device": self.torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                "command": self.results.get("command")}


def _load_mamba_ssm_from_sdist(sdist: Path) -> dict:
    """Build mamba_ssm's Mamba-1 CUDA extension from its source distribution (sm_90 only) and make
    `mamba_ssm.ops.selective_scan_interface` importable without running the package's __init__ (which needs more
    extensions than the selective scan). The peer's code is used as published; nothing of it is copied here."""
    import tarfile
    import types

    from torch.utils.cpp_extension import load

    started = time.perf_counter()
    target = Path("/tmp/mamba_ssm_sdist")
    if not any(target.glob("mamba_ssm-*")):  # a build running in the background may be reading these sources
        with tarfile.open(sdist) as archive:
            archive.extractall(target)
    source = next(target.glob("mamba_ssm-*"))
    csrc = source / "csrc" / "selective_scan"
    flags = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
             "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
             "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "-gencode", "arch=compute_90,code=sm_90"]
    extension = load("selective_scan_cuda", [str(p) for p in sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.cu"))],
                     extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=flags, extra_include_paths=[str(csrc)],
                     verbose=False)
    sys.modules["selective_scan_cuda"] = extension
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(source / "mamba_ssm")]
    sys.modules["mamba_ssm"] = package
    return {"sdist": sdist.name, "build_s": round(time.perf_counter() - started, 1)}


def build_peer(out: Path) -> None:
    """--build-peer: build mamba_ssm's extension and write what happened (build seconds, or the error) to `out`."""
    sdists = sorted((ROOT / ".whl").glob("mamba_ssm-*.tar.gz")) if (ROOT / ".whl").is_dir() else []
    try:
        if not sdists:
            raise FileNotFoundError(f"no mamba_ssm-*.tar.gz in {ROOT / '.whl'}")
        result = _load_mamba_ssm_from_sdist(sdists[-1])
    except Exception as error:  # the JSON says why, for the run that reads it
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc().splitlines()[-12:]}
    result["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result)[:400], flush=True)


def ncu_scan(device: str) -> list[list]:
    """The launches ncu profiles at the anchor shape (tiny in a dry run), for each chunk of CHUNK_SIZES: one
    training step first (it compiles and tunes both kernels), then one forward with checkpoints and one backward,
    each with the tuned config. [label, launches] in launch order (bench/ncu.py)."""
    import torch

    from archgen.resources import kernels_package

    kernels_package()
    from archgen_kernels import selective_scan as ss

    batch, seqlen, dim, dstate = (1, 40, 8, 4) if device == "cpu" else (8, 4096, 4096, 16)
    g = torch.Generator(device=device).manual_seed(4)

    def randn(*shape, scale=1.0, mean=0.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g, device=device) * scale + mean).to(dtype)

    u, z, dy = randn(batch, seqlen, dim), randn(batch, seqlen, dim), randn(batch, seqlen, dim)
    delta = randn(batch, seqlen, dim, scale=0.5, mean=-1.0)
    B, C = randn(batch, seqlen, dstate), randn(batch, seqlen, dstate)
    A = -torch.exp(torch.rand(dim, dstate, generator=g, device=device) * 2.772588722239781)
    D, delta_bias = randn(dim, dtype=torch.float32), randn(dim, scale=0.5, dtype=torch.float32)
    inputs = (u, delta, A, B, C, D, z, delta_bias, True, None)
    variants = []
    for chunk in CHUNK_SIZES:
        _, _, checkpoints = ss.selective_scan_forward(*inputs, save_checkpoints=True, chunk_size=chunk)
        ss.selective_scan_backward(dy, None, *inputs, checkpoints, chunk_size=chunk)  # both tuned now
        key = ss.shape_key(dim, dstate, chunk, u.dtype)
        with ncu.profiled(device):
            _, _, checkpoints = ss.selective_scan_forward(*inputs, save_checkpoints=True, chunk_size=chunk)
            ss.selective_scan_backward(dy, None, *inputs, checkpoints, chunk_size=chunk)
        variants += [[f"forward chunk {chunk} {ss.FORWARD_TUNER.chosen.get(key)}", 1],
                     [f"backward chunk {chunk} {ss.BACKWARD_TUNER.chosen.get(key)}", 1]]
    return variants


def _forward_backward(fn, args, grad_y, grad_state) -> dict:
    """fn(**args) -> (y, final_state); the backward of Σ y·grad_y + Σ final·grad_state; every result in float32."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
    y, state = fn(**leaves)
    ((y.float() * grad_y).sum() + (state.float() * grad_state).sum()).backward()
    out = {"y": y.detach().float(), "final_state": state.detach().float()}
    out.update({f"d{k}": v.grad.float() for k, v in leaves.items()})
    return out


def _errors(actual, expected) -> dict:
    """Max abs error, and max abs error relative to the largest reference magnitude."""
    diff = (actual.double() - expected.double()).abs()
    scale = expected.double().abs().max().item()
    max_abs = diff.max().item() if diff.numel() else 0.0
    finite = bool(actual.isfinite().all())
    return {"max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-30) if finite else float("inf"),
            "reference_max": scale, "finite": finite}


def _compiled(kernels) -> set:
    """Every compiled variant of these Triton kernels in this process (empty under the interpreter)."""
    return {compiled for kernel in kernels for caches in getattr(kernel, "device_caches", {}).values()
            for compiled in caches[0].values()}


def _registers(compiled_kernels) -> dict:
    """{kernel name: [registers a thread, bytes spilled]} of compiled variants, as the GPU's ptxas made them."""
    return {c.name: [getattr(c, "n_regs", None), getattr(c, "n_spills", None)] for c in compiled_kernels}


def _tuner_timings(ss, dim: int, dstate: int, chunk: int, dtype) -> dict:
    """Every config's time in the tuners' buckets of this shape: the forward's (inference), the forward's with
    checkpoints (training) and the backward's."""
    key = ss.shape_key(dim, dstate, chunk, dtype)
    return {"forward": ss.FORWARD_TUNER.timings.get(key),
            "forward_training": ss.FORWARD_TUNER.timings.get(ss.shape_key(dim, dstate, chunk, dtype, checkpoints=True)),
            "backward": ss.BACKWARD_TUNER.timings.get(key)}


def _tuner_report(tuner, key: str) -> dict:
    """The tuner's choice for key and the median ms (or the error) of every config it tried."""
    return {"best": tuner.chosen.get(key), "timings_ms": tuner.timings.get(key, {})}


SECTIONS = {"mamba_ssm": 10, "backward_configs": 20, "chunk_sizes": 30, "segments": 20, "correctness": 30, "autotune": 60,
            "anchor": 20, "reference_path": 20}
"""The sections after the copy bandwidth, in order, with the seconds each needs to be worth starting. The peer comes
first: it is the bar, and a budget spent on tuning must not skip it (session 6's first call lost it that way)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                        help="the JSON file to write, or a folder to write kernels.json into (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no section after this many seconds")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections (of {', '.join(SECTIONS)})")
    parser.add_argument("--build-peer", action="store_true",
                        help="only build mamba_ssm's CUDA extension from .whl/ (minutes, CPU) into torch's extension "
                             "cache, where a later run's mamba_ssm section finds it: start it in the background early")
    parser.add_argument("--ncu", action="store_true", help="then profile the kernels with Nsight Compute (bench/ncu.py)")
    parser.add_argument("--ncu-child", help=argparse.SUPPRESS)  # the workload a child under ncu runs (bench/ncu.py)
    args = parser.parse_args()
    if args.ncu_child:
        sys.path.insert(0, str(ROOT))
        ncu.child_main({"scan": ncu_scan}, args.ncu_child, args.out)
        return
    if args.out is None:
        raise SystemExit("pass --out (a .json file or a folder), or set $OUT")
    if args.out.suffix != ".json":
        args.out = args.out / "kernels.json"
    if args.build_peer:
        build_peer(args.out)
        return
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(only - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by the kernel module)
        os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"  # CPU tensors through the kernels, not the operator's reference

    import torch
    import triton

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run to exercise the code on the CPU")
    bench = Bench(args.out, args.dry_run, args.budget_s)
    bench.results.update({
        "device": "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "dry_run": args.dry_run,
        "chunk_size": bench.ss.CHUNK_SIZE,
    })
    torch.manual_seed(0)
    bench.section("copy_bandwidth", bench.copy_bandwidth)
    if "bytes_per_s" not in bench.results["copy_bandwidth"]:
        bench.bandwidth = float("nan")
    for name, needs_s in SECTIONS.items():
        if name in only:
            bench.section(name, getattr(bench, name), needs_s=needs_s)
    if args.ncu:
        bench.section("ncu", bench.ncu, needs_s=0 if args.dry_run else NCU_NEEDS_S)
    bench.results["tuned_configs"] = bench.ss.tuned_configs()
    from archgen_kernels import triton_support

    # The same choices with the GPU name and torch / triton versions: load_tuning_table() pins them on a like machine.
    bench.results["tuning_table"] = triton_support.tuning_table()
    bench.write()


if __name__ == "__main__":
    main()
