"""Gated DeltaNet on one GPU within a time budget: archgen's op against flash-linear-attention's
`chunk_gated_delta_rule` on the same inputs, in one run, written to one JSON file.

archgen's side is what a generated package runs: the chunked PyTorch reference (templates/runtime/gated_delta.py,
ops/gated_delta.py of a package), and the Triton kernels (kernels/gated_delta_rule.py, forward and backward) where
this checkout has them, as the op runs them (intermediates in the inputs' dtype) and the forward with float32
intermediates (more accurate, more bytes: GPU call 3 of session 5 measured both and chose). The shape is
gated_deltanet_hybrid's layer (Qwen3-Next's sizes): B = 4, T = 4096, H = 16 query/key heads read by HV = 32 value
heads, K = V = 128, chunk 64, bf16 q/k/v/β, float32 g and states, an initial state given and the final state
returned, as prefill after a cached prefix runs it.

Sections, in this order (--only picks some). Each records its own error and the run goes on; the JSON is rewritten
after each; a section whose estimate exceeds the budget left is skipped and says so (--budget-s, default 140 s).

  environment  device, torch / triton / fla versions, and whether fla's backward can run here: fla 0.6.0 raises
               "Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated chunk_bwd_dqkwg"
               on an H100/H200 with triton 3.6, before computing anything. Its own flags decide it
               (fla.utils.IS_NVIDIA_HOPPER, TRITON_ABOVE_3_7_1), so no time is spent compiling a backward that
               will refuse: the gradients are then compared only between archgen and float32, never with fla.
  config_check every candidate config of the kernels --tune-only names run once, forward and backward, each
               synchronized, in a loop of processes under CUDA_LAUNCH_BLOCKING=1 (not run unless named): a config that
               faults is recorded in gdn_config_check.json beside the JSON, and every later run with that folder leaves
               it out of the tuners' spaces (a fault inside a tuner lost GPU call 2 of session 8).
  speed        forward (no grad) ms of each side (but the float32-intermediates form, timed in session 5: its
               tuning would cost the run ~15 s), forward+backward ms of archgen's reference, archgen's kernels and
               fla where its backward runs; `figures` pairs each archgen figure with its peer from the same run
               (ratio = peer ms / archgen ms: above 1 means archgen is faster). The peer is fla's same measurement
               where it runs; the kernels' forward+backward is also held against the reference's, and, where fla's
               backward refuses, against fla's forward alone (a floor for fla's forward+backward, labelled so).
  profile      CUDA time per kernel of the kernels' forward, their forward+backward and fla's forward (torch.profiler,
               3 runs each; tables in gdn_profile_<run>.txt beside the JSON).
  numerics     at the timing shape, then at odd lengths (T = 1000, not a multiple of the chunk, and T = 1): o and
               the final state of every bf16 side (archgen's reference, archgen's kernel, fla) against a float32 run
               of archgen's reference on the same bf16-rounded values (relative norm ‖x − x₃₂‖ / ‖x₃₂‖; bar 1e-2),
               and each side against the others. Gradients (q, k, v, g, β, initial state of Σ o·do + Σ S·dS) of
               archgen's reference and archgen's kernels in bf16 against float32, and fla's where its backward runs.
  decode       one token at B = 4: the reference's `gated_delta_step` and the kernel's against fla's
               `fused_recurrent_gated_delta_rule` at T = 1 (outputs and new state compared, then timed).
  kernel_float32  archgen's kernel on float32 inputs against the reference in float32 (full float32 products on both
               sides; bar 1e-5) at T = 1000, not a multiple of the chunk; its first call tunes the float32 configs.
  fla_guard_lifted  fla's forward+backward with its triton-version guard switched off for the call (not run unless
               named in --only). The guard is fla.ops.common.chunk_o's test `IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0
               and not TRITON_ABOVE_3_7_1` in `chunk_bwd_dqkwg`: triton 3.4 to 3.7.0 miscompile that kernel's
               `tl.dot(tl.trans(b_ds), b_q)` on sm_90 (b_ds, an accumulator tile cast to bf16, transposed: fla
               issue #640, fixed in triton 3.7.1, fla PR #983), which gave wrong dg and dβ in fla's tests. Its only
               documented way round is the TileLang backend (package tilelang and nvcc), which the GPU machine lacks;
               FLA_DISABLE_BACKEND_DISPATCH=1 still reaches the guard. So the section times fla's forward+backward
               with the flag lifted, beside archgen's kernels in the same run, and measures every gradient of both
               against float32 at the timing shape: where fla's are within the bf16 bar, the miscompile does not touch
               this shape and the time is a fair peer; where they are not, the time is that of the same launches
               computing wrong values (a miscompiled layout conversion, not skipped work), labelled so. Also both
               forwards (the guard does not touch them) and a per-kernel CUDA-time table of fla's forward+backward
               beside archgen's, and the configs fla's autotuning chose. Before anything is timed,
               --fla-precompile-workers processes (8) compile shards of fla's autotuning configs side by side into
               Triton's on-disk cache (fla's first-call autotuning, ~130 s of GPU call 1 of session 8, is mostly
               compiling its configs one after the other); fla then tunes in this process as before, timing every
               config, each compile a cache hit.
  kernels_alone  fla_guard_lifted's archgen steps without fla (not run unless named): forward ms and errors,
               forward+backward ms, gradients against float32, CUDA time per kernel. fla's first-call autotuning took
               130 s of GPU call 1 of session 8; this measures a change to archgen's kernels in well under a minute,
               to be held against the fla figure of an earlier run (labelled so where reported).

fla's first call of each kernel compiles and autotunes (tens of seconds on the H200), and so do archgen's kernels
(every candidate config compiled and timed): the first section that runs them pays for it, and its estimate says so.

On the GPU machine, from the repository root (fla_core and einops wheels in .whl/, installed with --no-deps
--no-index when `fla` is not importable):
    python bench/gdn_check.py --out "$OUT" --budget-s 140
    python bench/gdn_check.py --only speed,profile --out "$OUT" --budget-s 90
    python bench/gdn_check.py --only fla_guard_lifted --tune-only wy --out "$OUT" --budget-s 100
    python bench/gdn_check.py --only kernels_alone --tune-only state_backward,chunk_backward --out "$OUT"
    timeout 200 python bench/gdn_check.py --only fla_guard_lifted --tune-only chunk_backward --budget-s 190 --out "$OUT"
    for i in 1 2 3; do CUDA_LAUNCH_BLOCKING=1 python bench/gdn_check.py --only config_check --tune-only chunk_backward \
        --out "$OUT" && break; done; python bench/gdn_check.py --only kernels_alone --tune-only chunk_backward --out "$OUT"
(--untuned: archgen's kernels run their first config, session 6's winners, and time no candidates; --tune-only: only
the kernels named time their candidates.)
On a CPU, to exercise the script (tiny shapes, the kernel in Triton's interpreter; without fla the peer is a
stand-in, the op's own decode step run token by token, so the comparison code runs):
    python bench/gdn_check.py --dry-run --out /tmp/gdn_check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from harness import bar_ratio  # noqa: E402 - bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
BF16_BAR = 1e-2  # relative norm, as issue 10 asks of bf16 kernels against their references
CHUNK = 64  # every side
TIMING_SHAPE = (4, 4096, 16, 32, 128, 128)  # (B, T, H, HV, K, V): gated_deltanet_hybrid's layer
ODD_SHAPES = {"B2-T1000-H16-HV32-K128-V128 (T not a multiple of 64)": (2, 1000, 16, 32, 128, 128),
              "B2-T1-H16-HV32-K128-V128 (one token)": (2, 1, 16, 32, 128, 128)}
DRY_TIMING_SHAPE = (1, 40, 2, 4, 16, 16)
DRY_ODD_SHAPES = {"B2-T37-H1-HV2-K16-V16": (2, 37, 1, 2, 16, 16), "B1-T1-H1-HV1-K16-V16": (1, 1, 1, 1, 16, 16)}
SECTIONS = ("config_check", "speed", "profile", "numerics", "numerics_odd_lengths", "decode", "kernel_float32",
            "fla_guard_lifted", "kernels_alone")
"""In the order they run: the timings first (GPU call 2 of session 6 spent its whole budget on numerics)."""
DEFAULT_SECTIONS = SECTIONS[1:-2]
"""What runs without --only: config_check runs every candidate once (a loop of processes), fla_guard_lifted runs fla
past its own refusal, and kernels_alone repeats its archgen steps, so each only when asked by name."""
ESTIMATE_S = {"config_check": 30, "speed": 60, "profile": 5, "numerics": 70, "numerics_odd_lengths": 10, "decode": 10,
              "kernel_float32": 20, "fla_guard_lifted": 30, "kernels_alone": 30}
"""Seconds each section may take on the H200 (the first one compiles and autotunes fla's and archgen's kernels)."""
PROFILE_RUNS = 3
FLA_PRECOMPILE_WORKERS = 8
"""Processes that compile shards of fla's autotuning configs side by side before fla_guard_lifted times anything
(--fla-precompile-workers; 0: none). 16 CPU cores on the lent H200; each worker holds one copy of fla's buffers at the
timing shape (a few GB)."""
FLA_PRECOMPILE_TIMEOUT_S = 120
CHECK_RUNS = 10
"""config_check's runs of each config: the illegal addresses triton 3.6 and 3.7 produce in kernels with several wgmma
dots on sm_90 are probabilistic (triton issues #10486, #11366), more likely over repeated launches."""
FLOAT32_BAR = 1e-5  # relative norm, issue 10's bar where the kernel's math is the reference's


def load_reference():
    """templates/runtime/gated_delta.py (ops/gated_delta.py of a generated package), with the ssm.py it imports from."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("templates.runtime.gated_delta")


def load_kernel() -> tuple[object | None, str]:
    """kernels/gated_delta_rule.py as archgen_kernels.gated_delta_rule, or None and why not."""
    if not (ROOT / "kernels/gated_delta_rule.py").is_file():
        return None, "this checkout has no kernels/gated_delta_rule.py"
    sys.path.insert(0, str(ROOT))
    try:
        from archgen.resources import kernels_package

        kernels_package()
        return importlib.import_module("archgen_kernels.gated_delta_rule"), "kernels/gated_delta_rule.py"
    except ImportError as error:
        return None, f"kernels/gated_delta_rule.py did not import: {error}"


def import_fla(dry_run: bool) -> tuple[object | None, dict]:
    """fla's gated-delta-rule ops, installing the wheels in .whl/ (no network on the GPU machines) if needed."""
    note: dict = {}
    try:
        import fla.ops.gated_delta_rule as fla_gdr
    except ImportError as error:
        wheels = sorted(str(p) for pattern in ("fla_core-*.whl", "einops-*.whl") for p in (ROOT / ".whl").glob(pattern))
        note["first_import"] = f"{type(error).__name__}: {error}"
        if dry_run or not any("fla_core" in w for w in wheels):
            note["skipped"] = f"fla not importable; wheels in .whl/: {wheels or 'none'}"
            return None, note
        install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *wheels],
                                 check=False, capture_output=True, text=True)
        note["pip_install"] = {"wheels": [Path(w).name for w in wheels], "rc": install.returncode,
                               "tail": (install.stdout + install.stderr)[-1500:]}
        try:
            import fla.ops.gated_delta_rule as fla_gdr
        except ImportError as error2:
            note["skipped"] = f"fla still not importable after installing the wheels: {error2}"
            return None, note
    import fla

    note["fla_version"] = getattr(fla, "__version__", "unknown")
    note["fla_file"] = fla.__file__
    return fla_gdr, note


def fla_backward_refusal() -> str | None:
    """Why fla's chunked backward will refuse on this machine (its own condition, read from its own flags), or None."""
    import triton
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_7_1

    if IS_NVIDIA_HOPPER and not TRITON_ABOVE_3_7_1:
        return (f"fla refuses its chunked backward on Hopper GPUs with triton < 3.7.1 (here triton {triton.__version__}): "
                "'Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated chunk_bwd_dqkwg "
                "(see #640)'. Not one of fla's gradients (dq, dk, dv, dg, dβ, dh0) can be compared here.")
    return None


@contextlib.contextmanager
def fla_version_guard_lifted():
    """fla's chunked backward past its refusal on Hopper with triton 3.4 to 3.7.0, for the duration (see the module
    docstring, fla_guard_lifted): the one flag its guard reads, in the one module that reads it."""
    from fla.ops.common import chunk_o

    saved = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = saved


class Check:
    def __init__(self, out: Path, dry_run: bool, budget_s: float, tuned: bool = True,
                 tune_only: list[str] | None = None):
        import torch

        self.torch = torch
        self.out = out
        self.dry_run = dry_run
        self.budget_s = budget_s
        self.device = "cpu" if dry_run or not torch.cuda.is_available() else "cuda"
        self.started = time.perf_counter()
        self.reference = load_reference()
        self.kernel, kernel_note = load_kernel()
        if self.kernel is not None and not tuned:
            importlib.import_module("archgen_kernels.triton_support").RUNTIME_TUNING = False
        self.tune_only = tune_only
        self.fla_precompile_workers = FLA_PRECOMPILE_WORKERS
        self.config_check_path = out / "gdn_config_check.json"
        if self.kernel is not None:
            if unknown := set(tune_only or ()) - set(self.kernel.TUNERS):
                raise SystemExit(f"--tune-only: no kernel {', '.join(sorted(unknown))}; they are "
                                 f"{', '.join(self.kernel.TUNERS)}")
            self.candidates = {name: list(tuner.configs) for name, tuner in self.kernel.TUNERS.items()}
            faulted = set(self.settle_config_check()["faulted"])
            for name, tuner in self.kernel.TUNERS.items():  # the first config: the last measured winner
                safe = [config for config in tuner.configs if _config_label(name, config) not in faulted]
                tuner.configs = safe if tune_only is None or name in tune_only else safe[:1]
                if self.device == "cuda":
                    tuner.tune = self._recording_faults(name, tuner.tune)
        self.fla, fla_note = import_fla(dry_run)
        self.fla_backward_refused = fla_backward_refusal() if self.fla is not None else None
        self.peer = "fla" if self.fla is not None else "stand_in"
        self.device_name = torch.cuda.get_device_name() if self.device == "cuda" else platform.processor() or "cpu"
        self.command = " ".join([Path(sys.executable).name, *sys.argv])
        self.results: dict = {
            "command": self.command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": {
                "device": self.device_name,
                "torch": torch.__version__,
                "triton": _version("triton"),
                "python": platform.python_version(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "fla": fla_note,
                "fla_backward": self.fla_backward_refused or "runs",
                "archgen_kernel": kernel_note,
                "archgen_kernel_configs": ("untuned: each kernel's first config" if not tuned else "tuned on first call"
                                           if tune_only is None else f"tuned: {tune_only}; the others' first config"),
                "peer": "fla chunk_gated_delta_rule" if self.fla else "stand-in: the op's gated_delta_step token by token",
                "budget_s": budget_s,
            },
            "shape": dict(zip(("B", "T", "H", "HV", "K", "V"), self.timing_shape, strict=True)),
            "chunk": CHUNK,
            "figures": [],
        }
        self.write()

    @property
    def timing_shape(self) -> tuple[int, ...]:
        return DRY_TIMING_SHAPE if self.dry_run else TIMING_SHAPE

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def write(self) -> None:
        if self.kernel is not None:  # which config each kernel's tuner chose so far, and every candidate's time
            self.results["kernel_tuning"] = {name: {"chosen": tuner.chosen, "timings_ms": tuner.timings}
                                             for name, tuner in self.kernel.TUNERS.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gdn_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def section(self, name: str, fn) -> None:
        left = self.budget_s - self.elapsed()
        if not self.dry_run and ESTIMATE_S[name] > left:
            self.results[name] = {"skipped": f"needs ~{ESTIMATE_S[name]} s, {left:.0f} s of --budget-s left"}
        else:
            started = time.perf_counter()
            try:
                self.results[name] = fn()
            except Exception as error:  # noqa: BLE001 — a section's failure is a result; the others still run
                self.results[name] = {"error": f"{type(error).__name__}: {error}"[:3000],
                                      "traceback": traceback.format_exc().splitlines()[-14:]}
            self.results[name]["section_s"] = round(time.perf_counter() - started, 2)
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        self.write()
        print(f"[{self.results['elapsed_s']:6.1f} s] {name}: {json.dumps(self.results[name], default=str)[:600]}",
              flush=True)

    def figure(self, name: str, archgen_ms: float, peer_ms: float | None, peer: str | None = None,
               bar: float | None = None) -> None:
        """One archgen time beside its peer's from this run (fla's same measurement unless `peer` names another);
        ratio = peer ms / archgen ms (above 1: archgen faster); bar: the ratio issue 10 asks for, where it asks."""
        fla = "fla chunk_gated_delta_rule" if self.fla else "stand-in: the op's decode step token by token"
        self.results["figures"].append({
            "figure": name, "archgen": round(archgen_ms, 4), "unit": "ms", "reference": peer or fla,
            "reference_value": round(peer_ms, 4) if peer_ms is not None else None,
            "ratio": bar_ratio(peer_ms / archgen_ms, bar) if peer_ms is not None else None, "bar": bar,
            "device": self.device_name, "date": datetime.date.today().isoformat(), "command": self.command,
        })

    def time_ms(self, fn, grad_to_none=None) -> float:
        """Median milliseconds: triton.testing.do_bench on the GPU, one wall-clock run on the CPU (meaningless)."""
        if self.device == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3

    # -- the sides -------------------------------------------------------------------------------------------------

    def sides(self, float32_intermediates: bool = True) -> dict:
        """{name: fn(q, k, v, g, beta, initial_state) -> (o, final_state)} of every side this run has."""
        sides = {"archgen_reference": self._reference}
        if self.kernel is not None:
            sides["archgen_kernel"] = self._kernel
            if float32_intermediates:
                sides["archgen_kernel_float32_intermediates"] = self._kernel_float32_intermediates
        sides[self.peer] = self._fla if self.fla is not None else self._stand_in
        return sides

    def _reference(self, q, k, v, g, beta, initial_state):
        return self.reference.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, chunk_size=CHUNK)

    def _kernel(self, q, k, v, g, beta, initial_state):
        return self.kernel.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, chunk_size=CHUNK)

    def _kernel_float32_intermediates(self, q, k, v, g, beta, initial_state):
        """The kernel with W, U, u and the chunk states in float32 (the op keeps them in q's dtype): more accurate,
        twice the bytes."""
        return self.kernel.gated_delta_rule_forward(q, k, v, g, beta, q.shape[-1] ** -0.5, initial_state, CHUNK,
                                                    intermediates=self.torch.float32)

    def _fla(self, q, k, v, g, beta, initial_state):
        return self.fla.chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state,
                                               output_final_state=True)

    def _stand_in(self, q, k, v, g, beta, initial_state):
        """Without fla (the dry run): the recurrence token by token through the op's own decode step."""
        state, outputs = initial_state, []
        for t in range(q.shape[1]):
            o_t, state = self.reference.gated_delta_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
            outputs.append(o_t)
        return self.torch.stack(outputs, dim=1), state

    def inputs(self, batch, seqlen, nheads, nv_heads, dk, dv, *, seed=0, dtype=None) -> dict:
        """The layer's operands: unit q and k, g = −exp(A_log)·softplus(a + dt_bias) (float32), β = sigmoid(b); q, k,
        v and β in dtype (bfloat16 unless given)."""
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=self.device)

        a_rate = torch.rand(nv_heads, generator=gen, device=self.device) * 15 + 1  # exp(A_log) ~ U(1, 16)
        dt_bias = torch.log(torch.expm1(torch.rand(nv_heads, generator=gen, device=self.device) * 0.099 + 0.001))
        bf16 = dtype or torch.bfloat16
        return {
            "q": self.reference.l2_normalize(randn(batch, seqlen, nheads, dk)).to(bf16),
            "k": self.reference.l2_normalize(randn(batch, seqlen, nheads, dk)).to(bf16),
            "v": randn(batch, seqlen, nv_heads, dv).to(bf16),
            "g": -a_rate * torch.nn.functional.softplus(randn(batch, seqlen, nv_heads) + dt_bias),
            "beta": torch.sigmoid(randn(batch, seqlen, nv_heads)).to(bf16),
            "initial_state": randn(batch, nv_heads, dk, dv),
        }

    # -- sections ----------------------------------------------------------------------------------------------------

    def numerics(self) -> dict:
        return self._numerics({"timing shape": self.timing_shape}, gradients=True)

    def numerics_odd_lengths(self) -> dict:
        return self._numerics(DRY_ODD_SHAPES if self.dry_run else ODD_SHAPES, gradients=False)

    def kernel_float32(self) -> dict:
        if self.kernel is None:
            return {"skipped": self.results["environment"]["archgen_kernel"]}
        torch = self.torch
        label, shape = next(iter((DRY_ODD_SHAPES if self.dry_run else ODD_SHAPES).items()))
        args = self.inputs(*shape, seed=21, dtype=torch.float32)
        with torch.no_grad():
            o, state = self._kernel(**args)
            o_ref, state_ref = self._reference(**args)
        report = {"shape": label, "bar_relative_norm": FLOAT32_BAR, "o": _relative_norm(o, o_ref),
                  "final_state": _relative_norm(state, state_ref)}
        report["passed"] = report["o"] <= FLOAT32_BAR and report["final_state"] <= FLOAT32_BAR
        return report

    def _numerics(self, shapes: dict, gradients: bool) -> dict:
        torch = self.torch
        report = {"bar_relative_norm": BF16_BAR, "truth": "archgen's reference on float32 copies of the bf16 inputs",
                  "shapes": {}}
        for label, shape in shapes.items():
            args = self.inputs(*shape, seed=len(report["shapes"]))
            entry = {"shape": dict(zip(("B", "T", "H", "HV", "K", "V"), shape, strict=True)), "vs_float32": {}}
            outputs = {}
            with torch.no_grad():
                truth = _as_float(self._reference(**{n: t.float() for n, t in args.items()}))
                for side, fn in self.sides().items():
                    try:
                        outputs[side] = _as_float(fn(**args))
                    except Exception as error:  # noqa: BLE001 — one side failing leaves the others' comparison
                        entry.setdefault("errors", {})[side] = f"{type(error).__name__}: {error}"[:1500]
            for side, (o, state) in outputs.items():
                entry["vs_float32"][side] = {"o": _relative_norm(o, truth[0]), "final_state": _relative_norm(state, truth[1])}
            names = list(outputs)
            entry["pairs"] = {f"{a} vs {b}": {"o": _relative_norm(outputs[a][0], outputs[b][0]),
                                              "final_state": _relative_norm(outputs[a][1], outputs[b][1])}
                              for i, a in enumerate(names) for b in names[i + 1:]}
            del outputs
            if gradients:
                entry["gradients"] = self._gradients(args, truth)
            judged = list(entry["vs_float32"].values())
            entry["passed"] = "errors" not in entry and all(e <= BF16_BAR for errors in judged for e in errors.values())
            report["shapes"][label] = entry
            if self.device == "cuda":
                torch.cuda.empty_cache()
        report["passed"] = all(e["passed"] for e in report["shapes"].values())
        return report

    def _gradients(self, args: dict, truth) -> dict:
        """Every input's gradient of Σ o·do + Σ S·dS: archgen's reference and kernels in bf16 and fla (where its
        backward runs), each against archgen's reference in float32."""
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(99)
        do = torch.randn(truth[0].shape, generator=gen, device=self.device).to(torch.bfloat16)
        dS = torch.randn(truth[1].shape, generator=gen, device=self.device)
        expected = _gradients(self._reference, {n: t.float() for n, t in args.items()}, do.float(), dS)
        report = {"archgen_reference": {n: _relative_norm(g, expected[n]) for n, g in
                                        _gradients(self._reference, args, do, dS).items()}}
        if self.kernel is not None:
            report["archgen_kernel"] = {n: _relative_norm(g, expected[n]) for n, g in
                                        _gradients(self._kernel, args, do, dS).items()}
        if self.fla is None or self.fla_backward_refused:
            report["fla"] = {"not_compared": self.fla_backward_refused or "no fla here (the dry run's stand-in has "
                                                                          "the reference's own gradients)"}
        else:
            report["fla"] = {n: _relative_norm(g, expected[n]) for n, g in _gradients(self._fla, args, do, dS).items()}
        return report

    def speed(self) -> dict:
        torch = self.torch
        shape = self.timing_shape
        args = self.inputs(*shape, seed=7)
        do = torch.randn(*shape[:2], shape[3], shape[5], device=self.device).to(torch.bfloat16)
        report = {"dtype": "bfloat16 q/k/v/beta, float32 g and states"}
        forward = {}
        for side, fn in self.sides(float32_intermediates=False).items():
            try:
                with torch.no_grad():
                    forward[side] = report[f"{side}_forward_ms"] = self.time_ms(lambda fn=fn: fn(**args))
            except Exception as error:  # noqa: BLE001 — one side failing leaves the others' times
                report[f"{side}_forward_error"] = f"{type(error).__name__}: {error}"[:1500]
        trainable = {"archgen_reference": self._reference}
        if self.kernel is not None:
            trainable["archgen_kernel"] = self._kernel
        if self.fla is not None and not self.fla_backward_refused:
            trainable["fla"] = self._fla
        backward = {}
        for side, fn in trainable.items():
            leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}

            def forward_backward(fn=fn, leaves=leaves):
                fn(**leaves)[0].backward(do)

            backward[side] = report[f"{side}_forward_backward_ms"] = self.time_ms(
                forward_backward, grad_to_none=list(leaves.values()))
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                forward_backward()
                report[f"{side}_forward_backward_peak_bytes"] = torch.cuda.max_memory_allocated()
        if "fla" not in backward:
            report["fla_forward_backward"] = self.fla_backward_refused or "not run (no fla)"
        label = "B{}-T{}-H{}-HV{}-K{}-V{}".format(*shape)
        for side in ("archgen_reference", "archgen_kernel", "archgen_kernel_float32_intermediates"):
            if side in forward:
                self.figure(f"Gated DeltaNet forward, {side.replace('_', ' ')} ({label}, bf16)", forward[side],
                            forward.get(self.peer))
        for side in (side for side in backward if side != "fla"):
            self.figure(f"Gated DeltaNet forward+backward, {side.replace('_', ' ')} ({label}, bf16)", backward[side],
                        backward.get("fla"), bar=1.0 if side == "archgen_kernel" else None)
        if "archgen_kernel" in backward:
            self.figure(f"Gated DeltaNet forward+backward, archgen kernels vs archgen reference ({label}, bf16)",
                        backward["archgen_kernel"], backward["archgen_reference"], "archgen reference forward+backward")
            if "fla" not in backward and self.peer in forward:
                self.figure(f"Gated DeltaNet forward+backward, archgen kernels vs {self.peer}'s forward alone ({label}, "
                            "bf16; its backward cannot run here)", backward["archgen_kernel"], forward[self.peer],
                            f"{self.peer} forward only (a floor for its forward+backward)")
        return report

    def profile(self) -> dict:
        """CUDA time per kernel name, ms per run, of the kernels' forward, their forward+backward and fla's forward."""
        if self.kernel is None:
            return {"skipped": self.results["environment"]["archgen_kernel"]}
        torch = self.torch
        shape = self.timing_shape
        args = self.inputs(*shape, seed=7)
        do = torch.randn(*shape[:2], shape[3], shape[5], device=self.device).to(torch.bfloat16)
        leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}

        def kernel_forward():
            with torch.no_grad():
                self._kernel(**args)

        def kernel_forward_backward():
            self._kernel(**leaves)[0].backward(do)

        runs = {"archgen_kernel_forward": kernel_forward, "archgen_kernel_forward_backward": kernel_forward_backward}
        if self.fla is not None:
            def fla_forward():
                with torch.no_grad():
                    self._fla(**args)

            runs["fla_forward"] = fla_forward
        return {name: self._profile(name, run) for name, run in runs.items()}

    def _profile(self, name: str, run) -> dict:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        run()  # compiled and tuned already by `speed`; this settles the allocator
        on_gpu = self.device == "cuda"
        with profiler(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILE_RUNS):
                run()
            if on_gpu:
                self.torch.cuda.synchronize()
        time_of = (lambda e: e.device_time_total) if on_gpu else (lambda e: e.cpu_time_total)
        events = sorted((e for e in prof.key_averages() if time_of(e) > 0), key=lambda e: -time_of(e))
        sort_by = "device_time_total" if on_gpu else "cpu_time_total"
        (self.out / f"gdn_profile_{name}.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=25))
        return {"ms_per_run": round(sum(time_of(e) for e in events) / PROFILE_RUNS / 1e3, 4) if on_gpu else None,
                "kernels": [{"kernel": e.key[:100], "calls_per_run": e.count / PROFILE_RUNS,
                             "ms_per_run": round(time_of(e) / PROFILE_RUNS / 1e3, 4)} for e in events[:14]]}

    def decode(self) -> dict:
        torch = self.torch
        batch, _, nheads, nv_heads, dk, dv = self.timing_shape
        args = self.inputs(batch, 1, nheads, nv_heads, dk, dv, seed=11)
        step = {n: (t[:, 0] if n != "initial_state" else t) for n, t in args.items()}

        def ours():
            return self.reference.gated_delta_step(step["initial_state"], step["q"], step["k"], step["v"], step["g"],
                                                   step["beta"])

        def theirs():
            if self.fla is None:
                return self._stand_in(**args)
            return self.fla.fused_recurrent_gated_delta_rule(  # keywords: its 5th positional is gk, not beta
                q=args["q"], k=args["k"], v=args["v"], g=args["g"], beta=args["beta"],
                initial_state=args["initial_state"], output_final_state=True,
            )

        with torch.no_grad():
            (o, S), (o_fla, S_fla) = ours(), theirs()
            report = {
                "o_relative_norm": _relative_norm(o.float(), o_fla[:, 0].float()),
                "state_relative_norm": _relative_norm(S.float(), S_fla.float()),
                "archgen_reference_ms": self.time_ms(ours),
                "fla_ms": self.time_ms(theirs),
            }
        report["passed"] = report["o_relative_norm"] <= BF16_BAR and report["state_relative_norm"] <= BF16_BAR
        report["ratio"] = report["fla_ms"] / report["archgen_reference_ms"]
        if self.kernel is not None:
            def kernel_step():
                return self.kernel.gated_delta_step(step["initial_state"], step["q"], step["k"], step["v"], step["g"],
                                                    step["beta"])

            with torch.no_grad():
                o_kernel, S_kernel = kernel_step()
                report.update({
                    "kernel_o_relative_norm_vs_reference": _relative_norm(o_kernel.float(), o.float()),
                    "kernel_state_relative_norm_vs_reference": _relative_norm(S_kernel.float(), S.float()),
                    "archgen_kernel_ms": self.time_ms(kernel_step),
                })
            report["kernel_ratio"] = report["fla_ms"] / report["archgen_kernel_ms"]
            self.figure(f"Gated DeltaNet decode step, archgen kernel (B{batch}-HV{nv_heads}-K{dk}-V{dv}, bf16)",
                        report["archgen_kernel_ms"], report["fla_ms"])
        return report

    def config_check_state(self) -> dict:
        """What config_check and the tuners found so far ($OUT/gdn_config_check.json)."""
        state = {"passed": [], "faulted": [], "errors": {}, "pending": None}
        if self.config_check_path.is_file():
            state.update(json.loads(self.config_check_path.read_text()))
        return state

    def save_config_check(self, state: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_check_path.write_text(json.dumps(state, indent=2) + "\n")

    def settle_config_check(self) -> dict:
        """The state a new process starts from: a config left `pending` is one whose run never returned (an earlier
        process died in it), so it counts as faulted."""
        state = self.config_check_state()
        if state["pending"]:
            state["faulted"].append(state["pending"])
            state["errors"][state["pending"]] = "the process died while it ran"
            state["pending"] = None
            self.save_config_check(state)
        return state

    def _recording_faults(self, name: str, tune):
        """tune, with the config each candidate's timing starts on saved as `pending` in gdn_config_check.json and the
        CUDA context checked between candidates: a fault inside the tuner (which records a failing config and goes
        on, but cannot go on past a dead context) then ends the process naming the config, and the next run with
        this $OUT leaves it out. The file is written only when the candidate changes: do_bench's timing loop is
        left alone."""
        torch = self.torch

        def tune_recording(key, launch, candidates=None):
            running = []

            def launch_recording(config):
                label = _config_label(name, config)
                if running and running[-1] == label:
                    return launch(config)
                if running and not _context_alive(torch):
                    raise SystemExit(f"{running[-1]} killed the CUDA context inside the {name} tuner; run again to go "
                                     "on past it")
                running.append(label)
                state = self.config_check_state()
                state["pending"] = label
                self.save_config_check(state)
                return launch(config)

            best = tune(key, launch_recording, candidates)
            if running and not _context_alive(torch):
                raise SystemExit(f"{running[-1]} killed the CUDA context inside the {name} tuner; run again")
            state = self.config_check_state()
            state["pending"] = None
            self.save_config_check(state)
            return best

        return tune_recording

    def config_check(self) -> dict:
        """Every candidate config of the kernels --tune-only names (all without it), one at a time, run once through
        the forward and the backward at the timing shape (the other kernels at their first config) and synchronized.
        An illegal address kills the CUDA context and every launch after it (GPU call 2 of session 8 lost its run
        to one, inside a tuner), so the state is written before each run: under CUDA_LAUNCH_BLOCKING=1 the failing
        launch names its kernel (the launcher's `launch_<kernel>` in the traceback), the process exits, and the
        next process of a loop (`for i in 1 2 3; do ... --only config_check && break; done`) goes on past it. Every
        later run with the same $OUT leaves faulted configs out of the tuners' spaces."""
        if self.kernel is None:
            return {"skipped": self.results["environment"]["archgen_kernel"]}
        torch = self.torch
        state = self.config_check_state()
        shape = self.timing_shape
        args = self.inputs(*shape, seed=7)
        do = torch.randn(*shape[:2], shape[3], shape[5], device=self.device).to(torch.bfloat16)
        positional = (args["q"], args["k"], args["v"], args["g"], args["beta"], shape[4] ** -0.5, args["initial_state"],
                      CHUNK)

        def save():
            self.save_config_check(state)

        for name in self.tune_only or list(self.kernel.TUNERS):
            for config in self.candidates[name]:
                label = _config_label(name, config)
                if label in state["passed"] or label in state["faulted"]:
                    continue
                configs = {other: tuner.configs[0] for other, tuner in self.kernel.TUNERS.items()} | {name: config}
                state["pending"] = label
                save()
                print(f"[{self.elapsed():6.1f} s] config_check {label}", flush=True)
                try:
                    for _ in range(1 if self.dry_run else CHECK_RUNS):
                        with torch.no_grad():
                            self.kernel.gated_delta_rule_forward(*positional, configs=configs)
                            self.kernel.gated_delta_rule_backward(do, None, *positional, configs=configs)
                    if self.device == "cuda":
                        torch.cuda.synchronize()
                except Exception as error:  # noqa: BLE001 — recorded; a dead context ends the process below
                    culprit = _launching_kernel(error) or name
                    failed = _config_label(culprit, configs[culprit])
                    state["faulted"].append(failed)
                    state["errors"][failed] = f"{type(error).__name__}: {error}"[:400]
                    state["pending"] = None
                    save()
                    if self.device == "cuda" and not _context_alive(torch):
                        raise SystemExit(f"config_check: {failed} killed the CUDA context ({error}); run again to go "
                                         "on past it") from error
                    continue
                state["passed"].append(label)
                state["pending"] = None
                save()
        return state

    def fla_guard_lifted(self) -> dict:
        """fla's forward+backward past its triton-version guard beside archgen's kernels, in steps that each rewrite the
        JSON (GPU call 2 of session 7 timed out inside one step holding everything, and left nothing): both forwards
        (issue 10's first figure; the guard does not touch them), archgen's forward+backward, fla's gradients against
        float32 (its backward's first call: fla's autotuning), fla's forward+backward, archgen's gradients, and the
        CUDA time per kernel of each forward+backward. fla's gradients decide how its time is labelled."""
        if self.kernel is None:
            return {"skipped": self.results["environment"]["archgen_kernel"]}
        peer = f"{self.peer}_guard_lifted" if self.fla is not None else self.peer
        if self.fla is None:
            guard, lifted = "no fla here", "nothing (the stand-in has no guard)"
        else:
            guard = self.fla_backward_refused or "fla's backward runs here with its guard in place"
            lifted = "fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True for the section"
        report = self.results["fla_guard_lifted"] = {"guard": guard, "lifted": lifted, "bar_relative_norm": BF16_BAR,
                                                     "steps_s": {}}
        if self.fla is not None and self.device == "cuda" and self.fla_precompile_workers > 0:
            report["fla_precompile"] = self._precompile_fla(self.fla_precompile_workers)
            self.write()
            print(f"[{self.elapsed():6.1f} s] fla_guard_lifted fla_precompile: {json.dumps(report['fla_precompile'])[:400]}",
                  flush=True)
        with fla_version_guard_lifted() if self.fla is not None else contextlib.nullcontext():
            self._in_steps("fla_guard_lifted", report, peer, self._fla if self.fla is not None else self._stand_in)
        if self.fla is not None:
            report["fla_tuned_configs"] = _fla_chosen_configs()
        return report

    def _precompile_fla(self, workers: int) -> dict:
        """fla's autotuning compiles every candidate config of every kernel it launches, one after the other (most of
        the ~130 s its first forward+backward took on a fresh H200 in GPU call 1 of session 8). Here `workers`
        processes each run fla's forward and backward once at the timing shape with a shard of every autotuner's
        configs and no timing, which compiles the shards side by side into Triton's on-disk cache; fla's own
        autotuning in this process then times every config as before, each compile a cache hit. Meanwhile this process
        compiles archgen's kernels (one forward+backward); where one of them has candidates to time (--tune-only),
        that runs first, on a quiet GPU. Nothing is timed while the workers run."""
        started = time.perf_counter()
        report: dict = {"workers": workers}
        tunes = self.kernel is not None and importlib.import_module("archgen_kernels.triton_support").RUNTIME_TUNING \
            and any(len(tuner.configs) > 1 for tuner in self.kernel.TUNERS.values())

        def archgen_once(label):
            try:
                self._run_once(self._kernel)
                report[label] = round(time.perf_counter() - started, 1)
            except Exception as error:  # noqa: BLE001 — the steps below run (and report) it again
                report["archgen_error"] = f"{type(error).__name__}: {error}"[:400]

        if tunes:
            archgen_once("archgen_compiled_and_tuned_first_s")
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(self.out)]
        procs = [subprocess.Popen([*command, "--fla-precompile-shard", f"{i}/{workers}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(workers)]
        if self.kernel is not None and not tunes:
            archgen_once("archgen_compiled_meanwhile_s")
        results = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, FLA_PRECOMPILE_TIMEOUT_S - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            results.append({"rc": proc.returncode, "tail": out[-300:]})
        report["rc"] = [r["rc"] for r in results]
        report["failed_tails"] = [r["tail"] for r in results if r["rc"] != 0][:2]
        report["s"] = round(time.perf_counter() - started, 1)
        return report

    def _run_once(self, fn) -> None:
        """One forward+backward of fn at the timing shape, as the steps run it (both with and without a final-state
        gradient), so that its kernels are compiled (and, where tuned, tuned)."""
        torch = self.torch
        shape = self.timing_shape
        args = self.inputs(*shape, seed=7)
        gen = torch.Generator(device=self.device).manual_seed(99)
        do = torch.randn(*shape[:2], shape[3], shape[5], generator=gen, device=self.device).to(torch.bfloat16)
        dS = torch.randn(shape[0], shape[3], shape[4], shape[5], generator=gen, device=self.device)
        with torch.no_grad():
            fn(**args)
        leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
        fn(**leaves)[0].backward(do)
        _gradients(fn, args, do, dS)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def kernels_alone(self) -> dict:
        """fla_guard_lifted's steps for archgen's kernels alone (no fla, none of its first-call autotuning): the
        forward and its errors, the forward+backward ms, every gradient against float32 and the CUDA time per kernel.
        For a run that measures a change to the kernels and the tuners' timings within ~60 s; its figures have no
        same-run peer."""
        if self.kernel is None:
            return {"skipped": self.results["environment"]["archgen_kernel"]}
        report = self.results["kernels_alone"] = {"bar_relative_norm": BF16_BAR, "steps_s": {}}
        self._in_steps("kernels_alone", report)
        return report

    def _in_steps(self, section: str, report: dict, peer: str | None = None, peer_fn=None) -> None:
        """archgen's kernels (and the peer, where named) at the timing shape, one step at a time into report, the JSON
        rewritten after each: archgen's forward first (a kill in the peer's first-call tuning keeps it)."""
        torch = self.torch
        shape = self.timing_shape
        label = "B{}-T{}-H{}-HV{}-K{}-V{}, bf16".format(*shape)
        sides = {"archgen_kernel": self._kernel, **({peer: peer_fn} if peer else {})}
        args = self.inputs(*shape, seed=7)
        gen = torch.Generator(device=self.device).manual_seed(99)
        do = torch.randn(*shape[:2], shape[3], shape[5], generator=gen, device=self.device).to(torch.bfloat16)
        dS = torch.randn(shape[0], shape[3], shape[4], shape[5], generator=gen, device=self.device)
        runs = {}
        for side, fn in sides.items():
            leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}

            def forward_backward(fn=fn, leaves=leaves):
                fn(**leaves)[0].backward(do)

            runs[side] = (forward_backward, list(leaves.values()))
        expected = {}

        def step(name, fn):
            started = time.perf_counter()
            report[name] = fn()
            report["steps_s"][name] = round(time.perf_counter() - started, 2)
            self.write()
            print(f"[{self.elapsed():6.1f} s] {section} {name}: {json.dumps(report[name], default=str)[:400]}",
                  flush=True)

        truth = []

        def forward(side):
            """The side's forward ms, and its o and final state against float32 (the tuned kernels ran right)."""
            with torch.no_grad():
                ms = self.time_ms(lambda: sides[side](**args))
                if not truth:
                    truth.extend(_as_float(self._reference(**{n: t.float() for n, t in args.items()})))
                o, state = _as_float(sides[side](**args))
            return {"ms": ms, "vs_float32": {"o": _relative_norm(o, truth[0]),
                                             "final_state": _relative_norm(state, truth[1])}}

        def forward_backward_ms(side):
            run, leaves = runs[side]
            return self.time_ms(run, grad_to_none=leaves)

        def gradients(side):
            if not expected:
                expected.update(_gradients(self._reference, {n: t.float() for n, t in args.items()}, do.float(), dS))
            return {n: _relative_norm(g, expected[n]) for n, g in _gradients(sides[side], args, do, dS).items()}

        step("archgen_kernel_forward", lambda: forward("archgen_kernel"))
        if peer:
            step(f"{peer}_forward", lambda: forward(peer))
            self.figure(f"Gated DeltaNet forward, archgen kernels ({label})", report["archgen_kernel_forward"]["ms"],
                        report[f"{peer}_forward"]["ms"],
                        f"{peer.replace('_guard_lifted', '').replace('_', ' ')} forward", bar=1.0)
        step("archgen_kernel_forward_backward_ms", lambda: forward_backward_ms("archgen_kernel"))
        if peer:
            step(f"{peer}_gradients_vs_float32", lambda: gradients(peer))
            step(f"{peer}_forward_backward_ms", lambda: forward_backward_ms(peer))
            wrong = {n: e for n, e in report[f"{peer}_gradients_vs_float32"].items() if not e <= BF16_BAR}
            report["peer_gradients_within_bar"] = not wrong
            verdict = ("its gradients within the bf16 bar here" if not wrong else
                       "its gradients wrong here ({}): the time of the same launches".format(
                           ", ".join(f"{n} {e:.2g}" for n, e in wrong.items())))
            self.figure(f"Gated DeltaNet forward+backward, archgen kernels vs {peer.replace('_', ' ')} ({label})",
                        report["archgen_kernel_forward_backward_ms"], report[f"{peer}_forward_backward_ms"],
                        f"{peer.replace('_', ' ')} forward+backward ({verdict})", bar=1.0)
        step("archgen_kernel_gradients_vs_float32", lambda: gradients("archgen_kernel"))
        def fresh(run, leaves):
            """run with the leaves' gradients reset first, as do_bench's grad_to_none does: otherwise each profiled
            run after the first adds its gradients to the last's, six elementwise kernels (0.19 ms a run at the bench
            shape, GPU call 2 of session 9) that no timing includes."""
            def run_fresh():
                for leaf in leaves:
                    leaf.grad = None
                run()
            return run_fresh

        step("profile", lambda: {side: self._profile(f"{side}_forward_backward", fresh(run, leaves))
                                 for side, (run, leaves) in runs.items()})


def _fla_autotuners() -> list:
    """Every triton Autotuner among fla's imported modules (under any @triton.heuristics wrapping it), once each."""
    from triton.runtime.autotuner import Autotuner

    found: dict[int, object] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for value in list(vars(module).values()):
            for _ in range(4):  # Heuristics(Autotuner(JITFunction)) at most
                if isinstance(value, Autotuner):
                    found[id(value)] = value
                value = getattr(value, "fn", None)
                if value is None:
                    break
    return list(found.values())


def _fla_chosen_configs() -> dict:
    """{kernel: {tuning key: chosen config}} of every fla autotuner that tuned in this process."""
    chosen = {}
    for tuner in _fla_autotuners():
        if tuner.cache:
            name = getattr(tuner, "base_fn", tuner.fn).__name__
            chosen[name] = {str(key): str(config) for key, config in tuner.cache.items()}
    return chosen


def fla_precompile_worker(shard: int, count: int) -> None:
    """One worker of Check._precompile_fla: fla's forward and backward at the timing shape, with each autotuner's
    configs cut to shard `shard` of `count` (a kernel with fewer configs than workers compiles one of its configs) and
    its benchmark replaced by one launch, so that this process only compiles its share into Triton's on-disk cache."""
    from types import SimpleNamespace

    import torch

    fla_gdr, note = import_fla(dry_run=False)
    if fla_gdr is None:
        raise SystemExit(f"no fla: {note}")
    for tuner in _fla_autotuners():
        configs = list(tuner.configs)
        mine = configs[shard::count] or configs[shard % len(configs):][:1]
        tuner.configs = mine
        tuner.__dict__["do_bench"] = lambda kernel_call, quantiles: (kernel_call(), [0.0] * len(quantiles))[1]
    runner = SimpleNamespace(torch=torch, device="cuda", reference=load_reference(), timing_shape=TIMING_SHAPE)
    runner.inputs = functools.partial(Check.inputs, runner)

    def fla(q, k, v, g, beta, initial_state):
        return fla_gdr.chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state,
                                              output_final_state=True)

    with fla_version_guard_lifted():
        Check._run_once(runner, fla)


def _config_label(kernel: str, config: dict) -> str:
    return f"{kernel}: {','.join(f'{name}={value}' for name, value in config.items())}"


def _launching_kernel(error: BaseException) -> str | None:
    """The kernel whose launcher (`launch_<kernel>` in kernels/gated_delta_rule.py) raised error, innermost first."""
    launchers = [frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)
                 if frame.f_code.co_name.startswith("launch_")]
    return launchers[-1].removeprefix("launch_") if launchers else None


def _context_alive(torch) -> bool:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception:  # noqa: BLE001 — any error here means the context is gone
        return False
    return True


def _as_float(result):
    o, state = result
    return o.float(), state.float()


def _gradients(fn, args: dict, do, dS) -> dict:
    """Every input's gradient of Σ o·do + Σ S_T·dS, in float32."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    o, S = fn(**leaves)
    ((o.float() * do.float()).sum() + (S.float() * dS).sum()).backward()
    return {f"d{n}": t.grad.float() for n, t in leaves.items()}


def _relative_norm(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ (inf when actual has a non-finite value)."""
    if not bool(actual.isfinite().all()):
        return float("inf")
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for gdn_check.json (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the kernel interpreted, fla not needed")
    parser.add_argument("--budget-s", type=float, default=140.0, help="sections stop starting when it would be passed")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)} (default: "
                        f"{','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--tune-only", default="",
                        help="comma-separated kernels of archgen's (keys of TUNERS: wy, state, output, intra_chunk_dpseudo, "
                             "state_backward, chunk_backward) whose candidates are all timed; the others run their "
                             "first config")
    parser.add_argument("--untuned", action="store_true",
                        help="archgen's kernels run their first config (session 6's winners) and time no candidates")
    parser.add_argument("--fla-precompile-workers", type=int, default=FLA_PRECOMPILE_WORKERS,
                        help="processes compiling shards of fla's autotuning configs before fla_guard_lifted times "
                             "anything (0: fla compiles each config itself as it tunes)")
    parser.add_argument("--fla-precompile-shard", default="", help=argparse.SUPPRESS)  # I/N: one such worker
    args = parser.parse_args()
    if args.fla_precompile_shard:
        shard, count = map(int, args.fla_precompile_shard.split("/"))
        fla_precompile_worker(shard, count)
        return
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    only = [name for name in args.only.split(",") if name] or list(DEFAULT_SECTIONS)
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"--only: no section {', '.join(sorted(unknown))}; the sections are {', '.join(SECTIONS)}")
    if args.dry_run:  # before triton is imported: the kernel runs in Triton's interpreter on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("ARCHGEN_TRITON_ON_CPU", "1")
    tune_only = [name for name in args.tune_only.split(",") if name] or None
    check = Check(args.out, args.dry_run, args.budget_s, tuned=not args.untuned, tune_only=tune_only)
    check.fla_precompile_workers = args.fla_precompile_workers
    runs = {"config_check": check.config_check, "speed": check.speed, "profile": check.profile, "numerics": check.numerics,
            "numerics_odd_lengths": check.numerics_odd_lengths, "decode": check.decode,
            "kernel_float32": check.kernel_float32, "fla_guard_lifted": check.fla_guard_lifted,
            "kernels_alone": check.kernels_alone}
    for name in SECTIONS:
        if name in only:
            check.section(name, runs[name])
    print(f"wrote {args.out / 'gdn_check.json'}")


if __name__ == "__main__":
    main()
