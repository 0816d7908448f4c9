"""The state-space kernels (kernels/ssd.py, causal_conv1d.py, state_update.py) on one GPU, in one run, against their
references and their peers measured in the same process. Results as JSON; the bar figures also in the bars.json
row format of issue 10.

Sections (each in try/except: one failing section is recorded and the others still run; the JSON is rewritten after
each, so a run cut short keeps what it measured; sections stop starting once --budget-s has passed):

  env           device, versions, the copy floor (a 2 GiB copy_, bytes read + written) and the bf16 matmul rate.
  ssd_numerics  the SSD kernels against templates/runtime/ssd.py's ssd_scan (what generated packages run) at the
                issue's shape (batch 8, L 4096, 64 heads × 64, d_state 128, 1 group, chunk 256): bf16 kernels vs the
                reference in float32 on the same bf16-rounded values, and a float32 run at batch 2; then a ragged
                shape (L 4000 = 15.6 chunks, 24 heads in 2 groups, initial state). y, the final state and every
                gradient (x, dt, A, B, C, D, dt_bias, initial_state): relative norm error against the bars
                (bf16 1e-2, float32 1e-5).
  ssd_timing    forward (inference) and forward+backward at the issue's shape, x/B/C bf16, dt fp32, D, dt_bias,
                softplus; the autotuner's per-config timings of every kernel (a per-kernel breakdown).
  ssd_peer      mamba_ssm's Triton `mamba_chunk_scan_combined` on the same inputs (from the sdist in .whl/, only its
                Triton SSD modules imported), forward and forward+backward; its first calls autotune (~85 s).
  conv          causal conv1d + SiLU at (8, 4096, 4096), width 4, bf16: numerics (bf16 and float32, every gradient)
                against the reference, forward GB/s against the copy floor, forward+backward, the one-step update.
  conv_peer     the causal-conv1d package's CUDA kernels (Dao-AILab) at the conv shape, built from its sdist in .whl/
                (causal_conv1d-*.tar.gz, sm_90 only, ~1.5-2.5 min with ninja; skipped when absent, or in a dry
                run), channels-last as ours (x (B, T, D) handed over transposed): numerics against ours, forward and
                backward (fwd+bwd - fwd) replayed from CUDA graphs, ours timed the same way: bars peer / ours >= 1.
  decode        one decoding step at batch 1, as a generated model runs it: one whole Bamba-1B Mamba-2 layer step
                (in_proj, conv update, SSM step, gate, RMSNorm, out_proj; 64 heads × 64, d_state 128) with the
                fused mamba2_step against the same layer with the PyTorch conv update and mamba_ssm's
                `selective_state_update`, eager and replayed from a CUDA graph; the Mamba-1 step (mamba_step, 4096
                channels, d_state 16) against `selective_state_update` too.

With --ncu, after the sections: Nsight Compute on the conv kernels at the conv shape (bench/ncu.py): the window
forward and backward at their default configs and the backward at 64 × 128 with PREFETCH (the H200's choice in
session 6), each launched once in a child process under ncu; DRAM bytes and throughput, occupancy, registers,
instructions and stall reasons per launch in the JSON's "conv_ncu", ncu's tables in ncu/conv.ncu.txt.

The two numbers (METHOD.md), at the SSD shape in bf16: the forward must read x (268 MB), write y (268 MB) and store and
reread the chunk states (2 × 268 MB in float32, which the gradients of the decays need), about 1.1 GB, 0.26 ms at
4.1 TB/s, and do about 0.1 TFLOP on the tensor cores (0.13 ms at 780 TFLOP/s): a floor near 0.3 ms against
mamba_ssm's 1.30 ms. The backward moves about twice the bytes
and three times the FLOPs: forward+backward near 0.8 ms against 5.5 ms. The conv1d forward at (8, 4096, 4096) moves
537 MB (x read, y written): 0.13 ms at the copy rate. A Bamba-1B Mamba-2 layer's decode step at batch 1 reads about
52 MB of weights (in_proj 35 MB, out_proj 17 MB) and 2 MB of state (twice): ~14 µs at the copy rate, so launches (a
dozen) dominate unless replayed from a CUDA graph.

The kernels' register use for sm_90 can be checked without a GPU: triton.compile(ASTSource(kernel, signature,
constexprs), target=GPUTarget("cuda", 90, 32)), then cuobjdump -res-usage on the cubin; the autotune spaces hold
configs that compiled without spills (or with few) that way.

Run from the repository root on the GPU machine (mamba_ssm's sdist in .whl/, as the lead carries it):
    python bench/ssm_kernels.py --out "$OUT"
    python bench/ssm_kernels.py --out "$OUT" --only ssd_numerics,ssd_timing --budget-s 300
    python bench/ssm_kernels.py --out "$OUT" --only conv --ncu
    python bench/ssm_kernels.py --build-conv-peer /tmp/conv_peer.json &   # at a call's start: the build takes > 4 min
Exercise every code path on a CPU (Triton's interpreter, tiny shapes, timings meaningless, peers skipped unless
their import is all that is tested):
    python bench/ssm_kernels.py --dry-run --out /tmp/ssm_bench
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
import os
import platform
import sys
import tarfile
import tempfile
import time
import traceback
import types
from pathlib import Path

import ncu
from harness import ROOT, Run, bench_ms, relative_norm

SECTIONS = ("env", "ssd_numerics", "ssd_timing", "ssd_peer", "conv", "conv_peer", "decode")

# The shapes, and the dry run's stand-ins (small, ragged, fast in the interpreter).
FULL = {
    "ssd": {"batch": 8, "seqlen": 4096, "nheads": 64, "headdim": 64, "ngroups": 1, "dstate": 128, "chunk": 256},
    "ssd_fp32_batch": 2,
    "ssd_ragged": {"batch": 2, "seqlen": 4000, "nheads": 24, "headdim": 64, "ngroups": 2, "dstate": 128, "chunk": 256},
    "conv": {"batch": 8, "seqlen": 4096, "dim": 4096, "width": 4},
    "layer": {"d_model": 2048, "nheads": 64, "headdim": 64, "ngroups": 1, "dstate": 128, "width": 4},
    "mamba1_step": {"dim": 4096, "dstate": 16},
}
DRY = {
    "ssd": {"batch": 1, "seqlen": 40, "nheads": 3, "headdim": 8, "ngroups": 1, "dstate": 16, "chunk": 32},
    "ssd_fp32_batch": 1,
    "ssd_ragged": {"batch": 1, "seqlen": 19, "nheads": 4, "headdim": 8, "ngroups": 2, "dstate": 5, "chunk": 16},
    "conv": {"batch": 1, "seqlen": 12, "dim": 20, "width": 4},
    "layer": {"d_model": 16, "nheads": 2, "headdim": 8, "ngroups": 1, "dstate": 16, "width": 4},
    "mamba1_step": {"dim": 20, "dstate": 16},
}
TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-5}


def load_runtime(name: str):
    """templates/runtime/<name>.py as the package `archgen_runtime` (ssd.py imports its helpers from .ssm)."""
    package = sys.modules.get("archgen_runtime")
    if package is None:
        package = types.ModuleType("archgen_runtime")
        package.__path__ = [str(ROOT / "templates" / "runtime")]
        sys.modules["archgen_runtime"] = package
    return importlib.import_module(f"archgen_runtime.{name}")


def causal_conv1d_sdist() -> Path | None:
    """The causal-conv1d sdist the lead carries in .whl/ (`pip download --no-deps --no-binary :all: causal-conv1d`),
    the newest by name, or None."""
    found = sorted(glob.glob(str(ROOT / ".whl" / "causal_conv1d-*.tar.gz"))
                   + glob.glob(str(ROOT / ".whl" / "causal-conv1d-*.tar.gz")))
    return Path(found[-1]) if found else None


def unpack_causal_conv1d(sdist: Path, target: Path | None = None) -> tuple[Path, list[Path]]:
    """Unpack the sdist into `target` (a fresh folder by default; an existing one is used as it is, so a build made
    from it earlier, e.g. by --build-conv-peer in the background, is found again by torch's loader and ninja):
    (the package's root, which holds csrc/ and causal_conv1d/, and the C++ and CUDA sources to build: in 1.x
    causal_conv1d.cpp, _fwd, _bwd, _update). Raises when there are none."""
    target = target or Path(tempfile.mkdtemp(prefix="causal_conv1d_"))
    if not any(target.glob("*/csrc/causal_conv1d.cpp")):
        with tarfile.open(sdist) as archive:
            archive.extractall(target)  # our own carried sdist
    roots = [path.parent.parent for path in target.glob("*/csrc/causal_conv1d.cpp")]
    if not roots:
        raise FileNotFoundError(f"{sdist.name} has no */csrc/causal_conv1d.cpp: not a causal-conv1d 1.x sdist")
    csrc = roots[0] / "csrc"
    return roots[0], sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.cu"))


CONV_PEER_SOURCES = Path("/tmp/causal_conv1d_sdist")
"""Where the conv peer is unpacked and built: one place, so that --build-conv-peer's build serves the section."""


def build_causal_conv1d(sdist: Path):
    """causal-conv1d's CUDA extension built from its sdist for sm_90 alone (its setup.py builds five architectures),
    and its Python interface imported without the package __init__: a bare `causal_conv1d` package whose __path__
    is the unpacked folder, the extension registered as `causal_conv1d_cuda` (the name its modules import). The
    peer's code is used as published; nothing of it is copied here. Returns (interface module, build seconds)."""
    from torch.utils.cpp_extension import load

    started = time.perf_counter()
    source, sources = unpack_causal_conv1d(sdist, CONV_PEER_SOURCES)
    csrc = source / "csrc"
    flags = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
             "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
             "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "-gencode", "arch=compute_90,code=sm_90"]
    extension = load("causal_conv1d_cuda", [str(path) for path in sources], extra_cflags=["-O3"],
                     extra_cuda_cflags=flags, extra_include_paths=[str(csrc)], verbose=False)
    sys.modules["causal_conv1d_cuda"] = extension
    package = types.ModuleType("causal_conv1d")
    package.__path__ = [str(source / "causal_conv1d")]
    sys.modules["causal_conv1d"] = package
    interface = importlib.import_module("causal_conv1d.causal_conv1d_interface")
    return interface, round(time.perf_counter() - started, 1)


def build_conv_peer(out: Path) -> int:
    """--build-conv-peer: build the causal-conv1d extension where the conv_peer section looks for it, and write what
    happened (sdist, build seconds, or the error) to `out`. Returns the exit status."""
    sdist = causal_conv1d_sdist()
    try:
        if sdist is None:
            raise FileNotFoundError(f"no causal_conv1d-*.tar.gz in {ROOT / '.whl'}")
        _, build_s = build_causal_conv1d(sdist)
        result = {"sdist": sdist.name, "build_s": build_s}
    except Exception as error:  # noqa: BLE001 - the JSON says why, for the run that reads it
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result)[:400], flush=True)
    return 0 if "error" not in result else 1


def import_mamba_ssm_triton(sdist: str | None):
    """mamba_ssm's Triton SSD and state-update modules from its sdist, without its package __init__ (which imports
    the CUDA extensions): a bare `mamba_ssm` package whose __path__ is the unpacked folder. Returns the modules."""
    if "mamba_ssm" not in sys.modules:
        candidates = [sdist] if sdist else sorted(glob.glob(str(ROOT / ".whl" / "mamba_ssm-*.tar.gz")))
        if not candidates or not candidates[-1] or not Path(candidates[-1]).exists():
            raise FileNotFoundError(f"no mamba_ssm sdist (looked for {sdist or ROOT / '.whl' / 'mamba_ssm-*.tar.gz'})")
        target = Path(tempfile.mkdtemp(prefix="mamba_ssm_"))
        with tarfile.open(candidates[-1]) as archive:
            members = [m for m in archive.getmembers() if "/mamba_ssm/" in m.name and m.isfile()]
            archive.extractall(target, members=members)  # our own carried sdist
        folder = next(target.glob("*/mamba_ssm"))
        for name, path in (("mamba_ssm", folder), ("mamba_ssm.ops", folder / "ops"),
                           ("mamba_ssm.ops.triton", folder / "ops" / "triton")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    return combined, update


class Bench(Run):
    """One run: the kernels, their references and peers, the shapes; sections return their record."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float, sdist: str | None):
        super().__init__("ssm_kernels", out, dry_run=dry_run, budget_s=budget_s)
        import torch

        self.torch = torch
        self.sdist = sdist
        self.shapes = DRY if dry_run else FULL
        from archgen.resources import kernels_package

        kernels_package()  # this checkout's kernels/ as archgen_kernels
        self.ssd = importlib.import_module("archgen_kernels.ssd")
        self.conv_kernels = importlib.import_module("archgen_kernels.causal_conv1d")
        self.step = importlib.import_module("archgen_kernels.state_update")
        self.triton_support = importlib.import_module("archgen_kernels.triton_support")
        self.runtime_ssd = load_runtime("ssd")

    def section(self, name: str, fn, *, needs_s: float = 0.0) -> None:
        super().section(name, lambda record: record.update(fn()), needs_s)

    # -- measuring ----------------------------------------------------------------------------------------------

    def time_ms(self, fn, grad_to_none=None) -> float:
        return bench_ms(fn, self.device, grad_to_none)

    def graph_ms(self, fn) -> float:
        """Median ms of fn replayed from a CUDA graph (launch gaps removed); fn is warmed up first."""
        torch = self.torch
        if self.device != "cuda":
            return self.time_ms(fn)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.time_ms(graph.replay)

    def randn(self, g, *shape, scale=1.0, mean=0.0, dtype=None):
        torch = self.torch
        return (torch.randn(*shape, generator=g, device=self.device) * scale + mean).to(dtype or torch.float32)

    def verdicts(self, errors: dict, tol: float) -> dict:
        return {"errors": {k: f"{v:.2e}" for k, v in errors.items()}, "tolerance": tol,
                "pass": all(v <= tol for v in errors.values()),
                "failing": [k for k, v in errors.items() if not v <= tol]}

    # -- SSD ----------------------------------------------------------------------------------------------------

    def ssd_inputs(self, batch, seqlen, nheads, headdim, ngroups, dstate, chunk, dtype, *, seed=0, init=False):
        """Mamba-2-like: raw dt around -1 (Δ = softplus(dt + bias) ≈ 0.3), A = -exp(.) in [-8, -0.5]; x, B, C in
        dtype, dt and the parameters in float32, as the Mamba-2 block passes them."""
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)
        args = {
            "x": self.randn(g, batch, seqlen, nheads, headdim, dtype=dtype),
            "dt": self.randn(g, batch, seqlen, nheads, scale=0.5, mean=-1.0),
            "A": -torch.exp(torch.rand(nheads, generator=g, device=self.device) * 2.77) * 0.5,
            "B": self.randn(g, batch, seqlen, ngroups, dstate, dtype=dtype),
            "C": self.randn(g, batch, seqlen, ngroups, dstate, dtype=dtype),
            "D": self.randn(g, nheads),
            "dt_bias": self.randn(g, nheads, scale=0.3),
        }
        if init:
            args["initial_state"] = self.randn(g, batch, nheads, headdim, dstate, scale=0.5)
        return args

    def ssd_kernel(self, t, chunk):
        return self.ssd.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, t["D"], t.get("initial_state"),
                                 dt_bias=t["dt_bias"], dt_softplus=True)

    def ssd_runtime(self, t, chunk):
        """templates/runtime/ssd.py's ssd_scan, the step size applied as the Mamba-2 block applies it."""
        step = self.torch.nn.functional.softplus(t["dt"].float() + t["dt_bias"])
        return self.runtime_ssd.ssd_scan(t["x"], step, t["A"], t["B"], t["C"], chunk, D=t["D"],
                                         initial_state=t.get("initial_state"))

    def ssd_compare(self, shape: dict, dtype, *, seed: int, init: bool) -> dict:
        """Kernel in `dtype` vs the runtime reference in float32 on the same values; every output and gradient."""
        torch = self.torch
        chunk = shape["chunk"]
        dims = {k: v for k, v in shape.items() if k != "chunk"}
        args = self.ssd_inputs(**dims, chunk=chunk, dtype=dtype, seed=seed, init=init)
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        y, final = self.ssd_kernel(leaves, chunk)
        g = torch.Generator(device=self.device).manual_seed(seed + 1)
        dy = self.randn(g, *y.shape)
        dfinal = self.randn(g, *final.shape)
        grads = torch.autograd.grad((y.float() * dy).sum() + (final * dfinal).sum(), list(leaves.values()))
        kernel = {"y": y.detach(), "final_state": final.detach()}
        kernel.update({f"d{k}": grad for k, grad in zip(leaves, grads, strict=True)})
        del y, final, grads, leaves
        ref_leaves = {k: v.detach().float().requires_grad_() for k, v in args.items()}
        y_ref, final_ref = self.ssd_runtime(ref_leaves, chunk)
        grads_ref = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dfinal).sum(), list(ref_leaves.values()))
        reference = {"y": y_ref.detach(), "final_state": final_ref.detach()}
        reference.update({f"d{k}": grad for k, grad in zip(ref_leaves, grads_ref, strict=True)})
        errors = {k: relative_norm(kernel[k], reference[k]) for k in reference}
        name = str(dtype).replace("torch.", "")
        return {"shape": shape, "dtype": name, **self.verdicts(errors, TOLERANCE[name])}

    def ssd_numerics(self) -> dict:
        torch = self.torch
        shape = self.shapes["ssd"]
        out = {}
        self.guarded(out, "bf16_full_shape", lambda: self.ssd_compare(shape, torch.bfloat16, seed=1, init=True))
        fp32_shape = dict(shape, batch=self.shapes["ssd_fp32_batch"])
        self.guarded(out, "fp32", lambda: self.ssd_compare(fp32_shape, torch.float32, seed=2, init=True))
        ragged = self.shapes["ssd_ragged"]
        self.guarded(out, "bf16_ragged", lambda: self.ssd_compare(ragged, torch.bfloat16, seed=3, init=True))
        self.guarded(out, "fp32_ragged", lambda: self.ssd_compare(ragged, torch.float32, seed=4, init=True))
        one = dict(ragged, seqlen=1)
        self.guarded(out, "fp32_length_1", lambda: self.ssd_compare(one, torch.float32, seed=5, init=True))
        return out

    def ssd_timing(self) -> dict:
        torch = self.torch
        shape = self.shapes["ssd"]
        chunk = shape["chunk"]
        dims = {k: v for k, v in shape.items() if k != "chunk"}
        args = self.ssd_inputs(**dims, chunk=chunk, dtype=torch.bfloat16, seed=10)
        out = {"shape": shape}
        with torch.no_grad():
            out["forward_ms"] = self.time_ms(lambda: self.ssd_kernel(args, chunk))
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        dy = torch.randn_like(args["x"])

        def forward_backward():
            y, _ = self.ssd_kernel(leaves, chunk)
            y.backward(dy)

        out["forward_backward_ms"] = self.time_ms(forward_backward, grad_to_none=list(leaves.values()))
        out["tuner_ms_per_config"] = {name: tuner.timings for name, tuner in self.ssd.TUNERS.items()}
        out["chosen"] = self.ssd.tuned_configs()
        # Per kernel, the tuner's median time of the config it chose (the launches between them, the cumsum and
        # the torch sums of partial results are not in it): where the forward+backward's time goes.
        out["breakdown_ms"] = {
            f"{name} {key}": timings.get(self.triton_support.config_name(out["chosen"][name][key]))
            for name, tuner in self.ssd.TUNERS.items() for key, timings in tuner.timings.items()
            if key in out["chosen"][name]
        }
        # The floor: x, B, C read and y written once (bf16), the chunk states stored and read back once (float32).
        b, t, h, p, n = shape["batch"], shape["seqlen"], shape["nheads"], shape["headdim"], shape["dstate"]
        out["forward_min_bytes"] = 2 * (2 * b * t * h * p + 2 * b * t * shape["ngroups"] * n) + 2 * 4 * b * (
            t // chunk) * h * p * n
        return out

    def ssd_peer(self) -> dict:
        torch = self.torch
        combined, _ = import_mamba_ssm_triton(self.sdist)
        if self.dry_run:
            return {"imported": combined.__name__, "timed": "skipped in the dry run (its kernels would run in the "
                                                             "interpreter)"}
        shape = self.shapes["ssd"]
        chunk = shape["chunk"]
        dims = {k: v for k, v in shape.items() if k != "chunk"}
        args = self.ssd_inputs(**dims, chunk=chunk, dtype=torch.bfloat16, seed=10)

        def peer(t):
            return combined.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                                                      dt_bias=t["dt_bias"], dt_softplus=True)

        out = {"shape": shape}
        started = time.perf_counter()
        with torch.no_grad():
            y_peer = peer(args)
            y_ours, _ = self.ssd_kernel(args, chunk)
        out["first_forward_s (autotune)"] = round(time.perf_counter() - started, 1)
        out["ours_vs_peer_rel_error_bf16"] = f"{relative_norm(y_ours, y_peer):.2e}"
        del y_peer, y_ours
        with torch.no_grad():
            out["peer_forward_ms"] = self.time_ms(lambda: peer(args))
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        dy = torch.randn_like(args["x"])

        def forward_backward():
            peer(leaves).backward(dy)

        started = time.perf_counter()
        forward_backward()
        out["first_backward_s (autotune)"] = round(time.perf_counter() - started, 1)
        out["peer_forward_backward_ms"] = self.time_ms(forward_backward, grad_to_none=list(leaves.values()))
        ours = self.sections.get("ssd_timing", {})
        label = (f"SSD B{shape['batch']} L{shape['seqlen']} H{shape['nheads']}x{shape['headdim']} N{shape['dstate']} "
                 f"G{shape['ngroups']} chunk {chunk}, bf16")
        peer_name = "mamba_ssm mamba_chunk_scan_combined (Triton)"
        for key, peer_key, what in (("forward_ms", "peer_forward_ms", "forward"),
                                    ("forward_backward_ms", "peer_forward_backward_ms", "forward+backward")):
            if isinstance(ours.get(key), float):
                out[f"ratio_{what}"] = out[peer_key] / ours[key]
                self.bar(f"{label}: {what}", ours[key], "ms", peer_name, out[peer_key], out[f"ratio_{what}"], 1.0)
        return out

    # -- conv1d -------------------------------------------------------------------------------------------------

    def conv(self) -> dict:
        torch = self.torch
        s = self.shapes["conv"]
        batch, seqlen, dim, width = s["batch"], s["seqlen"], s["dim"], s["width"]
        out = {"shape": s}
        g = torch.Generator(device=self.device).manual_seed(20)

        def compare(dtype, length):
            args = [self.randn(g, batch, length, dim, dtype=dtype), self.randn(g, dim, width, scale=0.5),
                    self.randn(g, dim), self.randn(g, batch, dim, width - 1, dtype=dtype)]
            leaves = [a.clone().requires_grad_() for a in args]
            y, state = self.conv_kernels.causal_conv1d(*leaves, activation="silu")
            dy, dstate = torch.randn_like(y, dtype=torch.float32), torch.randn_like(state, dtype=torch.float32)
            grads = torch.autograd.grad((y.float() * dy).sum() + (state.float() * dstate).sum(), leaves)
            ref_leaves = [a.detach().float().requires_grad_() for a in args]
            y_ref, state_ref = self.conv_kernels.causal_conv1d_reference(*ref_leaves, activation="silu")
            grads_ref = torch.autograd.grad((y_ref * dy).sum() + (state_ref * dstate).sum(), ref_leaves)
            errors = {"y": relative_norm(y, y_ref), "new_state": relative_norm(state, state_ref)}
            errors.update({f"d{name}": relative_norm(a, b) for name, a, b in
                           zip(("x", "weight", "bias", "conv_state"), grads, grads_ref, strict=True)})
            name = str(dtype).replace("torch.", "")
            return self.verdicts(errors, TOLERANCE[name])

        self.guarded(out, "numerics_bf16", lambda: compare(torch.bfloat16, seqlen))
        self.guarded(out, "numerics_fp32_ragged", lambda: compare(torch.float32, seqlen - 3))

        def timing():
            x = self.randn(g, batch, seqlen, dim, dtype=torch.bfloat16)
            weight, bias = self.randn(g, dim, width, scale=0.5), self.randn(g, dim)
            result = {}
            with torch.no_grad():
                result["forward_ms"] = self.time_ms(lambda: self.conv_kernels.causal_conv1d(x, weight, bias, None, "silu"))
            moved = 2 * x.numel() * x.element_size()
            result["forward_GBps"] = moved / result["forward_ms"] / 1e6
            leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
            dy = torch.randn_like(x)

            def forward_backward():
                self.conv_kernels.causal_conv1d(*leaves, None, "silu")[0].backward(dy)

            result["forward_backward_ms"] = self.time_ms(forward_backward, grad_to_none=leaves)
            result["backward_min_bytes_GB"] = 4 * x.numel() * x.element_size() / 1e9  # x, dy read; dx written; y
            # The backward alone: x and dy read, dx written, at the least (one pass for widths up to 4; the two-pass
            # backward of wider kernels adds a round trip of dL/d pre-activation).
            backward_ms = result["forward_backward_ms"] - result["forward_ms"]
            result["backward_GBps"] = 3 * x.numel() * x.element_size() / backward_ms / 1e6
            # The launchers alone (no autograd, no op dispatch): the GPU's part of the calls above
            with torch.no_grad():
                result["forward_launcher_ms"] = self.time_ms(
                    lambda: self.conv_kernels.causal_conv1d_forward(x, weight, bias, None, True))
                result["backward_launcher_ms"] = self.time_ms(
                    lambda: self.conv_kernels.causal_conv1d_backward(dy, None, x, weight, bias, None, True))
            # The GPU's time, replayed from a CUDA graph: the eager calls above wait on the host when it is slow (call 3
            # of session 7: 0.31 ms eager for a 0.15 ms forward); the bars take these where the capture worked
            def graphed_forward_backward():
                torch.autograd.grad(self.conv_kernels.causal_conv1d(*leaves, None, "silu")[0], leaves, dy)

            try:
                with torch.no_grad():
                    result["forward_graphed_ms"] = self.graph_ms(
                        lambda: self.conv_kernels.causal_conv1d(x, weight, bias, None, "silu"))
                result["forward_backward_graphed_ms"] = self.graph_ms(graphed_forward_backward)
                forward_ms = result["forward_graphed_ms"]
                backward_ms = result["forward_backward_graphed_ms"] - forward_ms
                timing = ", CUDA graph"
            except Exception as error:  # noqa: BLE001 - a failed capture leaves the eager figures for the bars
                result["graph_error"] = f"{type(error).__name__}: {error}"[:300]
                forward_ms, timing = result["forward_ms"], ""
            result["bar_forward_GBps"] = moved / forward_ms / 1e6
            result["bar_backward_GBps"] = 3 * x.numel() * x.element_size() / backward_ms / 1e6
            copy = self.sections.get("env", {}).get("copy_GBps")
            if isinstance(copy, float):
                result["forward_launcher_fraction_of_copy"] = moved / result["forward_launcher_ms"] / 1e6 / copy
                result["backward_launcher_fraction_of_copy"] = (3 * x.numel() * x.element_size()
                                                                / result["backward_launcher_ms"] / 1e6 / copy)
                result["backward_fraction_of_copy"] = result["backward_GBps"] / copy
                result["fraction_of_copy"] = result["forward_GBps"] / copy
                self.bar(f"causal conv1d + SiLU forward ({batch}, {seqlen}, {dim}) width {width}, bf16{timing}",
                         result["bar_forward_GBps"], "GB/s", "copy_ of 2 GiB (bytes read + written)", copy,
                         result["bar_forward_GBps"] / copy, 0.8)
                self.bar(f"causal conv1d + SiLU backward ({batch}, {seqlen}, {dim}) width {width}, bf16 (fwd+bwd - fwd"
                         f"{timing})", result["bar_backward_GBps"], "GB/s", "copy_ of 2 GiB (bytes read + written)",
                         copy, result["bar_backward_GBps"] / copy, 0.8)
            # The window backward's d weight / d bias sum alone, at the parts the tuned config writes (the tuner's
            # times include it): what a backward without a second launch could save
            chosen = self.conv_kernels.WINDOW_BACKWARD_TUNER.chosen.get(
                self.conv_kernels._key(dim, width, None, torch.bfloat16, "-silu"))
            if chosen is not None:
                rows = -(-seqlen // (chosen.get("SEGMENTS", 1) * chosen["BLOCK_T"]))
                part = torch.zeros((batch, rows, width + 1, dim), dtype=torch.float32, device=x.device)
                result["window_parts_ms"] = self.time_ms(lambda: self.conv_kernels._summed_parts(part, weight, bias))
            result["tuned"] = self.conv_kernels.tuned_configs()
            result["tuner_ms_per_config"] = {"forward": self.conv_kernels.FORWARD_TUNER.timings,
                                             "silu_backward": self.conv_kernels.SILU_BACKWARD_TUNER.timings,
                                             "backward": self.conv_kernels.BACKWARD_TUNER.timings,
                                             "window_backward": self.conv_kernels.WINDOW_BACKWARD_TUNER.timings}
            return result

        self.guarded(out, "timing", timing)

        def update_step():
            x = self.randn(g, 1, dim, dtype=torch.bfloat16)
            state = self.randn(g, 1, dim, width - 1, dtype=torch.bfloat16)
            weight, bias = self.randn(g, dim, width, scale=0.5), self.randn(g, dim)
            y, new_state = self.conv_kernels.causal_conv1d_update(x, state, weight, bias, "silu")
            y_ref, state_ref = self.conv_kernels.causal_conv1d_reference(x.unsqueeze(1), weight, bias, state, "silu")
            return {"rel_error_y": f"{relative_norm(y, y_ref.squeeze(1)):.2e}",
                    "state_equal": bool(torch.equal(new_state, state_ref)),
                    "step_us": 1e3 * self.time_ms(lambda: self.conv_kernels.causal_conv1d_update(x, state, weight, bias,
                                                                                         "silu"))}

        self.guarded(out, "update_step_batch1", update_step)
        return out

    def conv_peer(self) -> dict:
        """The causal-conv1d package's kernels against ours (see the module's docstring)."""
        torch = self.torch
        sdist = causal_conv1d_sdist()
        if sdist is None:
            return {"skipped": f"no causal_conv1d-*.tar.gz in {ROOT / '.whl'}"}
        if self.dry_run:
            return {"sdist": sdist.name, "skipped": "the dry run builds no CUDA extension"}
        interface, build_s = build_causal_conv1d(sdist)
        out = {"sdist": sdist.name, "build_s": build_s}
        s = self.shapes["conv"]
        batch, seqlen, dim, width = s["batch"], s["seqlen"], s["dim"], s["width"]
        g = torch.Generator(device=self.device).manual_seed(21)
        x = self.randn(g, batch, seqlen, dim, dtype=torch.bfloat16)
        weight, bias = self.randn(g, dim, width, scale=0.5), self.randn(g, dim)
        dy = torch.randn_like(x)

        def peer(x, weight, bias):  # channels-last: (B, D, T) views of our (B, T, D) tensors, as its kernels take them
            return interface.causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)

        def ours(x, weight, bias):
            return self.conv_kernels.causal_conv1d(x, weight, bias, None, "silu")[0]

        results = {}
        for name, fn in (("peer", peer), ("ours", ours)):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            y = fn(*leaves)
            results[name] = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
        out["numerics_vs_ours"] = self.verdicts(
            {name: relative_norm(a, b) for name, a, b in
             zip(("y", "dx", "dweight", "dbias"), results["peer"], results["ours"], strict=True)},
            TOLERANCE["bfloat16"])
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        for name, fn in (("peer", peer), ("ours", ours)):
            with torch.no_grad():
                out[f"{name}_forward_graphed_ms"] = self.graph_ms(lambda fn=fn: fn(x, weight, bias))
            out[f"{name}_forward_backward_graphed_ms"] = self.graph_ms(
                lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, dy))
            out[f"{name}_backward_ms"] = out[f"{name}_forward_backward_graphed_ms"] - out[f"{name}_forward_graphed_ms"]
        label = f"causal conv1d + SiLU ({batch}, {seqlen}, {dim}) width {width}, bf16, CUDA graph"
        peer_name = f"causal-conv1d {sdist.name.removesuffix('.tar.gz').split('-', 1)[1]} (CUDA)"
        for what, key in (("forward", "forward_graphed_ms"), ("backward (fwd+bwd - fwd)", "backward_ms")):
            out[f"ratio_{key}"] = out[f"peer_{key}"] / out[f"ours_{key}"]
            self.bar(f"{label}: {what}", out[f"ours_{key}"], "ms", peer_name, out[f"peer_{key}"],
                     out[f"ratio_{key}"], 1.0)
        return out

    def conv_ncu(self) -> dict:
        """Nsight Compute on the conv kernels (ncu_conv's launches); a dry run only runs the workload."""
        if self.dry_run:
            return {"variants": ncu_conv(self.device)}
        return ncu.profile(Path(__file__), "conv", "_conv_", self.out / "ncu", timeout_s=max(self.budget_s - self.elapsed(), 60))

    # -- decoding -----------------------------------------------------------------------------------------------

    def decode(self) -> dict:
        torch = self.torch
        F = torch.nn.functional
        out = {}
        try:
            _, update = import_mamba_ssm_triton(self.sdist)
            peer_update = None if self.dry_run else update.selective_state_update
        except Exception as error:  # noqa: BLE001 -- the peer is optional; ours is still measured
            out["peer_import_error"] = f"{type(error).__name__}: {error}"
            peer_update = None
        s = self.shapes["layer"]
        nheads, headdim, ngroups, dstate, width = s["nheads"], s["headdim"], s["ngroups"], s["dstate"], s["width"]
        d_inner = nheads * headdim
        conv_dim = d_inner + 2 * ngroups * dstate
        g = torch.Generator(device=self.device).manual_seed(30)
        bf16 = torch.bfloat16

        A_log = torch.rand(nheads, generator=g, device=self.device)
        A = -torch.exp(A_log)  # mamba_ssm's argument
        D, dt_bias = self.randn(g, nheads), self.randn(g, nheads, scale=0.3)

        # One whole Mamba-2 layer step (Bamba-1B sizes), batch 1.
        def layer_step():
            d_model = s["d_model"]
            in_proj = torch.nn.Linear(d_model, 2 * d_inner + 2 * ngroups * dstate + nheads, bias=False,
                                      device=self.device, dtype=bf16)
            out_proj = torch.nn.Linear(d_inner, d_model, bias=False, device=self.device, dtype=bf16)
            conv_w, conv_b = self.randn(g, conv_dim, width, scale=0.5, dtype=bf16), self.randn(g, conv_dim, dtype=bf16)
            norm_w = torch.ones(d_inner, device=self.device, dtype=bf16)
            hidden = self.randn(g, 1, d_model, dtype=bf16)
            conv_state = self.randn(g, 1, conv_dim, width - 1, dtype=bf16)  # ours: the K-1 inputs before this one
            peer_conv_state = self.randn(g, 1, conv_dim, width, dtype=bf16)  # mamba_ssm's: a window of all K inputs
            ssm_state = self.randn(g, 1, nheads, headdim, dstate, scale=0.5)

            def split(h):
                z, xbc, dt_raw = in_proj(h).split([d_inner, conv_dim, nheads], dim=-1)
                return z, xbc, dt_raw

            def ours():  # the conv update, SiLU, Δ, SSM step, D skip and z gate in one launch (mamba2_step)
                z, xbc, dt_raw = split(hidden)
                y, new_conv, new_ssm = self.step.mamba2_step(z, xbc, dt_raw, conv_state, conv_w, conv_b,
                                                             ssm_state, A_log, D, dt_bias, 0.0, math.inf, ngroups)
                conv_state.copy_(new_conv)
                ssm_state.copy_(new_ssm)
                return out_proj(F.rms_norm(y, (d_inner,), norm_w, 1e-5))

            def peer():  # mamba_ssm's Mamba2.step without causal_conv1d: torch's conv update, then its SSM update
                z, xbc, dt_raw = split(hidden)
                peer_conv_state.copy_(torch.roll(peer_conv_state, shifts=-1, dims=-1))
                peer_conv_state[:, :, -1] = xbc
                xbc = F.silu((peer_conv_state * conv_w).sum(-1) + conv_b)
                xs, Bs, Cs = xbc.split([d_inner, ngroups * dstate, ngroups * dstate], dim=-1)
                y = peer_update(ssm_state, xs.view(1, nheads, headdim), dt_raw[:, :, None].expand(1, nheads, headdim),
                                A[:, None, None].expand(nheads, headdim, dstate), Bs.view(1, ngroups, dstate),
                                Cs.view(1, ngroups, dstate), D[:, None].expand(nheads, headdim),
                                dt_bias=dt_bias[:, None].expand(nheads, headdim), dt_softplus=True)
                y = y.reshape(1, d_inner) * F.silu(z)
                return out_proj(F.rms_norm(y, (d_inner,), norm_w, 1e-5))

            result = {}
            with torch.no_grad():
                step_args = (*split(hidden), conv_state, conv_w, conv_b, ssm_state, A_log, D, dt_bias, 0.0, math.inf,
                             ngroups)
                y, _, new_ssm = self.step.mamba2_step(*step_args)
                y_ref, _, ssm_ref = self.step.mamba2_step_reference(*step_args)
                result["rel_error_y"] = f"{relative_norm(y, y_ref):.2e}"
                result["rel_error_state"] = f"{relative_norm(new_ssm, ssm_ref):.2e}"
                result["ours_eager_us"] = 1e3 * self.time_ms(ours)
                result["ours_graph_us"] = 1e3 * self.graph_ms(ours)
                best = result["ours_graph_us"]
                if peer_update is not None:
                    result["peer_eager_us"] = 1e3 * self.time_ms(peer)
                    result["peer_graph_us"] = 1e3 * self.graph_ms(peer)
                    result["ratio_graph"] = result["peer_graph_us"] / best
                    self.bar("one decode step of a Bamba-1B Mamba-2 layer, batch 1, bf16 (CUDA graph)",
                             best, "us", "the same layer with mamba_ssm selective_state_update "
                             "and the PyTorch conv update", result["peer_graph_us"], result["ratio_graph"], 1.0)
            return result

        self.guarded(out, "bamba_layer_step_batch1", layer_step)

        def mamba1_step():
            m = self.shapes["mamba1_step"]
            dim, n1 = m["dim"], m["dstate"]
            state1 = self.randn(g, 1, dim, n1, scale=0.5)
            u, delta, z = (self.randn(g, 1, dim, dtype=bf16) for _ in range(3))
            A1_log = torch.rand(dim, n1, generator=g, device=self.device) * 2
            B1, C1 = self.randn(g, 1, n1, dtype=bf16), self.randn(g, 1, n1, dtype=bf16)
            D1, bias1 = self.randn(g, dim), self.randn(g, dim, scale=0.3)
            step_args = (state1, u, delta, A1_log, B1, C1, D1, z, bias1)
            y1, s1 = self.step.mamba_step(*step_args)
            y1_ref, s1_ref = self.step.mamba_step_reference(*step_args)
            result = {"rel_error_y": f"{relative_norm(y1, y1_ref):.2e}", "rel_error_state": f"{relative_norm(s1, s1_ref):.2e}",
                      "ours_us": 1e3 * self.time_ms(lambda: self.step.mamba_step(*step_args))}
            if peer_update is not None:
                peer_state, A1 = state1.clone(), -torch.exp(A1_log)
                result["peer_us"] = 1e3 * self.time_ms(lambda: peer_update(peer_state, u, delta, A1, B1, C1, D1, z,
                                                                           dt_bias=bias1, dt_softplus=True))
            return result

        self.guarded(out, "mamba1_step_batch1", mamba1_step)
        return out

    # -- environment --------------------------------------------------------------------------------------------

    def env(self) -> dict:
        torch = self.torch
        import triton

        info = {"device": self.meta.get("gpu", "cpu (dry run)"), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "interpreting": self.ssd.interpreting()}
        if self.device == "cuda":
            src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
            dst = torch.empty_like(src)
            ms = self.time_ms(lambda: dst.copy_(src))
            info["copy_GBps"] = 2 * src.numel() * src.element_size() / ms / 1e6
            del src, dst
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            info["bf16_matmul_TFLOPs"] = 2 * 8192**3 / self.time_ms(lambda: a @ b) / 1e9
        else:
            info["copy_GBps"] = 1.0  # a stand-in so the dry run exercises the bar rows
        return info


def ncu_conv(device: str) -> list[list]:
    """The launches ncu profiles at the conv shape (bf16 x, float32 weight and bias, SiLU, no state), each once after a
    warm-up: the window forward and backward at their default configs (the backward's: 128 × 64 with PREFETCH), the
    backward at 256 × 64 (session 9's choice before segments) and at four segments of 256 with the edges kept in L2
    (each backward followed by its d weight / d bias sum, which the kernel filter matches too).
    Returns [label, launches] in launch order (bench/ncu.py)."""
    import torch

    from archgen.resources import kernels_package

    kernels_package()
    conv = importlib.import_module("archgen_kernels.causal_conv1d")
    s = (DRY if device != "cuda" else FULL)["conv"]
    g = torch.Generator(device=device).manual_seed(0)
    x, dy = (torch.randn(s["batch"], s["seqlen"], s["dim"], generator=g, device=device).to(torch.bfloat16)
             for _ in range(2))
    weight, bias = torch.randn(s["dim"], s["width"], generator=g, device=device), torch.randn(s["dim"], generator=g,
                                                                                              device=device)
    forward = conv.forward_candidates(s["width"])[0]
    backwards = [*conv.WINDOW_BACKWARD_CONFIGS[:2],
                 next(c for c in conv.WINDOW_BACKWARD_CONFIGS if c.get("SEGMENTS") and c.get("KEEP_EDGES"))]
    launches = {f"forward {forward}": lambda: conv.causal_conv1d_forward(x, weight, bias, None, True, config=forward)}
    for config in backwards:
        launches[f"backward {config}"] = lambda config=config: conv.causal_conv1d_backward(
            dy, None, x, weight, bias, None, True, config=config)
    for fn in launches.values():  # compiled and warm before the profiled region
        fn()
    with ncu.profiled(device):
        for fn in launches.values():
            fn()
    return [[label, 1 if label.startswith("forward") else 2] for label in launches]  # a backward: the walk, the sum


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results/ssm_kernels"),
                        help="directory for ssm_kernels.json and ssm_kernels.bars.json (default: $OUT)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this many seconds")
    parser.add_argument("--mamba-sdist", default=None, help="mamba_ssm sdist (default: .whl/mamba_ssm-*.tar.gz)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--ncu", action="store_true", help="then profile the conv kernels with Nsight Compute")
    parser.add_argument("--ncu-child", help=argparse.SUPPRESS)  # the workload a child under ncu runs (bench/ncu.py)
    parser.add_argument("--build-conv-peer", type=Path, metavar="JSON",
                        help="only build the causal-conv1d peer (for a background job at a call's start: the conv_peer "
                             "section then finds the build) and write its seconds or its error to JSON")
    args = parser.parse_args(argv)
    if args.build_conv_peer:
        return build_conv_peer(args.build_conv_peer)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"
    if args.ncu_child:
        ncu.child_main({"conv": ncu_conv}, args.ncu_child, Path(args.out))
        return 0
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    bench = Bench(Path(args.out), args.dry_run, args.budget_s, args.mamba_sdist)
    # Rough needs, so a section that cannot finish is not started: the peer autotunes for ~85 s on its first calls.
    needs = {"env": 5, "ssd_numerics": 60, "ssd_timing": 60, "ssd_peer": 150, "conv": 40, "conv_peer": 200,
             "decode": 30}
    if "env" not in only:
        only = ["env", *only]  # the copy floor and the device name are needed by the bar rows
    for name in SECTIONS:
        if name in only:
            bench.section(name, getattr(bench, name), needs_s=0 if args.dry_run else needs[name])
    if args.ncu:
        bench.section("conv_ncu", bench.conv_ncu, needs_s=0 if args.dry_run else 60)
        print("\n".join(ncu.summary_lines(bench.sections["conv_ncu"])))
    print("\nbars:")
    for row in bench.bars:
        print(f"  {row['figure']}: {row['archgen']:.4g} {row['unit']} vs {row['reference_value']:.4g} "
              f"({row['reference']}) ratio {row['ratio']:.3g}, bar {row['bar']}")
    failing = {name: result.get("failing") for name, result in bench.sections.get("ssd_numerics", {}).items()
               if isinstance(result, dict) and result.get("failing")}
    print(f"ssd numerics failing: {failing or 'none'}; wrote {bench.out / 'ssm_kernels.json'} and "
          f"{bench.out / 'ssm_kernels.bars.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
