"""Compile every launch config of every kernel for the H200 (sm_90) on a machine without a GPU, and tabulate what
ptxas made of each: registers, spilled bytes, shared memory, compile errors, and which config an untuned package runs.

Why: Triton's CPU interpreter (the kernel tests) runs no compiler, so a config that does not compile for sm_90,
needs more shared memory than an SM has, or spills registers shows up only on the GPU, which is lent a few minutes
a session. A spilling or failing config costs little while it is one candidate among many (the tuner times it or
skips it), but the config a package runs untuned (`Autotuner._untuned`: the tuner's `default` when among the
call's candidates, else the first candidate) is what every generated package without a tuning table launches.

How: the real launchers run on small-to-real-size CPU tensors while Triton's active driver is `AuditDriver`, a stub
whose target is GPUTarget("cuda", 90, 32). Triton 3.6's JITFunction.run asks the active driver for the current
device, stream and target (`create_binder`: `driver.active.get_current_target()`), compiles the specialization the
arguments select for that target (TTIR → TTGIR → LLIR → PTX → cubin, ptxas included: the backend is the real
nvidia one), then launches through `CompiledKernel.run`, whose first use calls `_init_handles`: that checks
`metadata.shared` against `driver.active.utils.get_device_properties(device)["max_shared_mem"]` (raising
OutOfResources as on the GPU), loads the cubin with `driver.active.utils.load_binary(name, cubin, shared, device)`
and builds the launcher with `driver.active.launcher_cls(src, metadata)`. The stub answers those three calls:
the H200's properties; a `load_binary` that loads nothing but reads the cubin's resource usage with the cuobjdump
shipped in the triton wheel (REG, what the CUDA driver reports as CU_FUNC_ATTRIBUTE_NUM_REGS, Triton's n_regs; STACK
+ LOCAL, the per-thread local memory, LOCAL_SIZE_BYTES, which Triton's driver.c divides by 4 into n_spills; and,
where there is any, the STL instructions of the SASS, since spilled registers are stored there with STL) and hands
back a `Resources` record as the "function" handle; and a launcher that launches nothing and records the Resources
and the compiled kernel's metadata (warps, stages, shared memory, hash) of every launch it is called for.

What runs: for every spec (specs/*.yaml by default, and bench/specs/bamba_1b.yaml, whose Mamba-2 layers are the
SSD's seed), `archgen.emit.tune.tuning_cases` lists the kernel files its IR runs with their parameter shapes, as
`archgen build --autotune` does, and each file's `autotune` hook runs them at batch 1 and the sequence lengths
given (so the shape-dependent constexprs are the launchers' own, for the seeds' real widths). Every Autotuner's
`tune` is replaced by one that launches every candidate the launcher offers for that shape bucket, each in a
recording context (a failure is recorded, not raised), and returns the untuned default. Kernel files without a
hook (ssd, state_update, silu_mul, normalized_mean) and the GDN decoding step get the calls a generated block makes
(`extra_cases`).
A few launcher guards read the device (CUDA tensors only, the SM count, TMA on compute capability >= 9): the
kernel modules' `triton_on_cpu` / `interpreting` names (not silu_mul's, whose config depends on it) answer True
and the SM-count helpers see an H200 (132 SMs); nothing else of the kernels is changed.

Run it on the CPU machine, under a Python with triton 3.6 (the GPU machine's) and torch (see docs/design.md,
Kernels, "sm_90 audit"):

    PYTHONPATH=$PWD /work/t36torch/bin/python bench/sm90_audit.py --out bench/results/sm90_audit.md

Compiles are cached in Triton's cache (~/.triton/cache), so a second run takes seconds. --only FILE[,FILE] and
--specs narrow it. Exit status 1 when an untuned default fails to compile or spills (unless `ACCEPTED`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

H200 = {"max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132, "warpSize": 32,
        "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}
"""The properties Triton's CUDA driver reports for an H200 (sharedMemPerBlockOptin, regsPerBlock, SM count)."""
TARGET_ARCH = 90
DEFAULT_SPECS = ("specs/*.yaml", "bench/specs/bamba_1b.yaml")


# ---------------------------------------------------------------------------------------------------------------
# The stub driver
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the CUDA driver would report for one loaded cubin (the "function" handle the stub hands Triton)."""

    name: str
    registers: int
    local_bytes: int  # per thread: the stack frame and local arrays (Triton's n_spills is this / 4)
    spill_stores: int  # STL instructions in the SASS: the local memory holds spilled registers
    max_threads: int

    @property
    def spills(self) -> int:
        """Triton's n_spills when the local memory holds spills (STL in the code), else 0."""
        return self.local_bytes // 4 if self.spill_stores else 0


def _nvidia_bin(tool: str) -> str:
    from triton.backends.nvidia import compiler

    return str(Path(compiler.__file__).parent / "bin" / tool)


def _cuobjdump() -> str:
    return _nvidia_bin("cuobjdump")


def resources(name: str, cubin: bytes) -> Resources:
    """Registers and local memory of a cubin's kernel, read with `cuobjdump --dump-resource-usage`: REG, and STACK +
    LOCAL (the per-thread local memory, where ptxas puts spilled registers: its -v "bytes stack frame"); when there
    is any, the SASS's STL instructions are counted (a stack frame without stores holds no spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", file.name], check=True, capture_output=True,
                              text=True).stdout
        fields = {}
        for line in text.splitlines():
            if "REG:" in line:
                fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
        local = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
        stores = 0
        if local:
            sass = subprocess.run([_cuobjdump(), "-sass", file.name], check=True, capture_output=True, text=True).stdout
            stores = sum(1 for line in sass.splitlines() if " STL" in line)
    registers = int(fields["REG"])
    # the CUDA driver's MAX_THREADS_PER_BLOCK: registers are allocated per warp in units of 256
    per_warp = -(-registers * 32 // 256) * 256
    max_threads = min(1024, H200["max_num_regs"] // max(per_warp, 1) * 32)
    return Resources(name, registers, local, stores, max_threads)


class _Utils:
    def get_device_properties(self, device):
        return dict(H200)

    def load_binary(self, name, cubin, shared, device):
        found = resources(name, cubin)
        return object(), found, found.registers, found.local_bytes // 4, found.max_threads


class _Launcher:
    """Stands for Triton's CudaLauncher: launching records the launch instead."""

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, *launch):  # (grid x, y, z, stream, function, packed metadata, ..., kernel arguments)
        RECORDER.launched(launch[4], self.metadata, self.src)


def audit_driver():
    """The stub: a Triton driver for an H200 that compiles for real and launches nothing (see the module doc)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class AuditDriver(DriverBase):
        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = _Launcher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            from triton.backends.nvidia.driver import ty_to_cpp

            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", TARGET_ARCH, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("the sm_90 audit driver times nothing")

    return AuditDriver()


def install_driver():
    from triton.runtime import driver

    driver.set_active(audit_driver())


# ---------------------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    file: str
    tuner: str  # "" for a launch outside any tuner (a fixed config)
    key: str
    config: str
    default: bool
    kernel: str = ""
    registers: int | None = None
    spills: int | None = None
    local_bytes: int | None = None
    spill_stores: int | None = None
    shared: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    error: str = ""
    hash: str = ""
    constexprs: dict = dataclasses.field(default_factory=dict)  # the specialization's constexpr arguments
    cases: set = dataclasses.field(default_factory=set)


class Recorder:
    def __init__(self):
        self.rows: list[Row] = []
        self.context: dict | None = None  # the tuner config being compiled
        self.case = ""
        self.file = ""

    def launched(self, function: Resources, metadata, src) -> None:
        context = self.context or {"tuner": "", "key": "", "config": "", "default": True}
        self.rows.append(Row(self.file, context["tuner"], context["key"], context["config"], context["default"],
                             kernel=function.name, registers=function.registers, spills=function.spills,
                             local_bytes=function.local_bytes, spill_stores=function.spill_stores,
                             shared=metadata.shared, num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                             hash=metadata.hash, constexprs=_constexprs(src), cases={self.case}))

    def failed(self, error: BaseException) -> None:
        context = self.context or {"tuner": "", "key": "", "config": "", "default": True}
        self.rows.append(Row(self.file, context["tuner"], context["key"], context["config"], context["default"],
                             error=_error_text(error), cases={self.case}))


RECORDER = Recorder()


def _constexprs(src) -> dict:
    """{argument name: value} of a compiled specialization's constexpr arguments (ASTSource.constants is keyed by
    argument paths; a None argument is a constexpr too)."""
    names = getattr(getattr(src, "fn", None), "arg_names", None)
    if not names:
        return {}
    return {names[path[0]]: value for path, value in getattr(src, "constants", {}).items()
            if len(path) == 1 and isinstance(value, bool | int | float | str)}


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # ptxas and MLIR errors: the first line names the failure, a later "error" line says what
    wanted = [line for line in lines if "error" in line.lower()][:2]
    return " / ".join(dict.fromkeys([lines[0], *wanted]))[:300] if lines else type(error).__name__


def audit_tune(self, key, launch, candidates=None):
    """Stands for Autotuner.tune: launch (compile) every candidate in a recording context; return the untuned
    default, as `_untuned` picks it outside the interpreter."""
    from archgen_kernels.triton_support import config_name

    candidates = self.configs if candidates is None else candidates
    default = self.untuned_config(candidates)
    OFFERED.setdefault(self.name, []).extend(config_name(c) for c in candidates)
    for config in candidates:
        RECORDER.context = {"tuner": self.name, "key": key, "config": config_name(config),
                            "default": config == default}
        try:
            launch(config)
        except Exception as error:  # recorded: the tuner would skip this config
            RECORDER.failed(error)
        finally:
            RECORDER.context = None
    return default


OFFERED: dict[str, list[str]] = {}  # tuner → every config name offered as a candidate


# ---------------------------------------------------------------------------------------------------------------
# The kernels, as if on an H200
# ---------------------------------------------------------------------------------------------------------------

KEEPS_INTERPRETING = {"silu_mul"}  # reads interpreting() to choose its config: left alone
KERNEL_FILES = tuple(sorted(path.stem for path in (ROOT / "kernels").glob("*.py")
                            if path.stem not in ("__init__", "triton_support")))  # every op file, one added included


def load_kernels(pdl: bool = False) -> dict:
    """Import archgen_kernels' op files with their device guards answering as on an H200 (see the module doc); with
    pdl, their `programmatic_launch` answers True (the kernels compiled with their gdc calls, launched with
    launch_pdl), as on an H200 with ARCHGEN_PDL unset; without, False (the CPU tensors' answer)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from archgen.resources import kernels_package

    kernels_package()
    support = importlib.import_module("archgen_kernels.triton_support")
    support.Autotuner.tune = audit_tune
    props = SimpleNamespace(multi_processor_count=H200["multiprocessor_count"], major=9, minor=0, name="H200 (audit)")
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    cuda = torch.device("cuda", 0)
    modules = {}
    for name in KERNEL_FILES:
        module = importlib.import_module(f"archgen_kernels.{name}")
        if hasattr(module, "triton_on_cpu"):
            module.triton_on_cpu = lambda: True
        if hasattr(module, "interpreting") and name not in KEEPS_INTERPRETING:
            module.interpreting = lambda: True
        if hasattr(module, "programmatic_launch"):
            module.programmatic_launch = lambda device, pdl=pdl: pdl
        for helper in ("_multiprocessors", "_segments_to_fill"):  # they read the device's SM count
            if hasattr(module, helper):
                original = getattr(module, helper)
                original = getattr(original, "__wrapped__", original)  # functools.cache
                setattr(module, helper, lambda device, *rest, original=original: original(cuda, *rest))
        modules[name] = module
    return modules


def extra_cases(modules: dict, file: str, config: dict, params: dict, seqlen: int, dtype) -> bool:
    """The calls a generated block makes to kernels no `autotune` hook runs (fixed configs: the decoding steps,
    silu_mul, normalized_mean, greedy_pick, combine_projections; decode_attention's one-launch form, which its hook does not take;
    qkv_rope's and in_proj_conv's kernels, with and without the folded RMSNorm, whose hooks tune the plain GEMVs'
    buckets), with the parameter shapes of the case; False when the file has none."""
    import torch

    def randn(*shape, dt=dtype):
        return torch.randn(shape).to(dt)

    if file == "silu_mul":
        hidden = params["gate_proj.weight"][0]
        gate, up = randn(1, seqlen, hidden).requires_grad_(), randn(1, seqlen, hidden).requires_grad_()
        modules["silu_mul"].silu_mul(gate, up).sum().backward()
    elif file == "normalized_mean":
        N = next(iter(params.values()))[0]
        vectors = [torch.ones(N, dtype=dtype) for _ in range(4)]
        modules["normalized_mean"].normalized_mean(randn(1, seqlen, N), randn(1, seqlen, N), *vectors, 1e-6)
        # decoding's form: the combine, the block's residual add and its feed-forward norm (ADD_NORM)
        modules["normalized_mean"].normalized_mean_add_norm(randn(1, 1, N), randn(1, 1, N), *vectors, 1e-6,
                                                            randn(1, 1, N), vectors[0], 1e-6)
    elif file == "combine_projections":  # a parallel layer's pair: attention's o_proj (K = N), Mamba's out_proj (2N)
        N = next(iter(params.values()))[0]
        vectors = [torch.ones(N, dtype=dtype) for _ in range(5)]
        a, b, h, s = (torch.empty(1, N, dtype=dtype) for _ in range(4))
        for branch, K in enumerate((N, 2 * N)):
            modules["combine_projections"].combining_linear_(randn(1, K), randn(N, K), branch, a, b, *vectors[:4], 1e-6,
                                                             randn(1, N), vectors[4], 1e-6, h, s)
    elif file == "decode_attention":  # the one-launch form (COMBINE) beside the hook's two-launch one
        HQ, HKV, D = config["n_heads"], config["n_kv_heads"], config["head_dim"]
        window = config.get("window") or 0
        S = min(seqlen, window) if window else seqlen
        positions = torch.arange(S)
        modules["decode_attention"].decode_attention_forward(randn(1, HQ, 1, D), randn(1, HKV, S, D), randn(1, HKV, S, D),
                                                             positions[-1:], positions, window, D**-0.5, one_launch=True)
    elif file == "state_update" and "x_proj.weight" in params:  # Mamba-1's step, both forms of Δ
        D, N = params["A_log"]
        rank = params["dt_proj.weight"][1]
        su = modules["state_update"]
        state = torch.zeros(1, D, N)
        A_log, skip, bias = torch.zeros(D, N), torch.ones(D), torch.zeros(D)
        su.mamba_step_(state, randn(1, D), randn(1, D), A_log, randn(1, N), randn(1, N), skip, randn(1, D), bias)
        su.mamba_step_low_rank_(state, randn(1, D), randn(1, rank), randn(D, rank), A_log, randn(1, N), randn(1, N),
                                skip, randn(1, D), bias)
    elif file == "state_update":  # Mamba-2's step, on slices of one in-projection row as the block passes them
        H, P, N, G = config["n_heads"], config["head_dim"], config["d_state"], config["n_groups"]
        channels, width = params["conv1d.weight"][0], params["conv1d.weight"][-1]
        row = randn(1, params["in_proj.weight"][0])
        z, xbc, dt = row[:, :H * P], row[:, H * P:H * P + channels], row[:, H * P + channels:]
        modules["state_update"].mamba2_step_(z, xbc, dt, randn(1, channels, width - 1), randn(channels, width),
                                             randn(channels), torch.zeros(1, H, P, N), torch.zeros(H), torch.ones(H),
                                             torch.zeros(H), 0.0, float("inf"), G)
    elif file == "qkv_rope":  # its hook tunes the qkv bucket with qkv_linear's kernel: this one at each of its configs
        from archgen_kernels.triton_support import config_name

        gemv, qkv_rope = modules["gemv"], modules["qkv_rope"]
        HQ, HK, D, R = config["n_heads"], config["n_kv_heads"], config["head_dim"], config["rope"]["rotary_dim"]
        K = next(shape for name, shape in params.items() if name.endswith("q_proj.weight"))[1]
        N = (HQ + 2 * HK) * D
        weights = randn(HQ * D, K), randn(HK * D, K), randn(HK * D, K)
        angles = torch.rand(1, R // 2)
        caches = [torch.zeros(1, HK, seqlen, D, dtype=dtype) for _ in "kv"]
        own = gemv.shape_config(N, K, 1, H200["multiprocessor_count"])
        candidates = [own, *(c for c in gemv.CONFIGS if c != own)]
        default = gemv.FORWARD_TUNER.untuned_config(candidates)
        for candidate in candidates:
            for norm in (None, torch.ones(K, dtype=dtype)):  # and with the block's RMSNorm folded in (NORM)
                RECORDER.context = {"tuner": "gemv.forward", "config": config_name(candidate),
                                    "key": gemv.shape_key(N, K, 1, dtype, False) + ("-qkv" if norm is None else "-qkv-norm"),
                                    "default": candidate == default}
                try:
                    qkv_rope.qkv_rope_write_kv_forward(randn(1, 1, K), *weights, None, None, None, angles.cos(),
                                                       angles.sin(), *caches, torch.tensor([seqlen - 1]), norm, 1e-6,
                                                       config=candidate)
                except Exception as error:
                    RECORDER.failed(error)
                finally:
                    RECORDER.context = None
    elif file == "in_proj_conv":  # its hook tunes in_proj's bucket with the plain GEMV: this kernel at each config
        from archgen_kernels.triton_support import config_name

        gemv, in_proj_conv = modules["gemv"], modules["in_proj_conv"]
        N, K = next(shape for name, shape in params.items() if name.endswith("in_proj.weight"))
        D, _, width = next(shape for name, shape in params.items() if name.endswith("conv1d.weight"))
        own = gemv.shape_config(N, K, 1, H200["multiprocessor_count"])
        candidates = [own, *(c for c in gemv.CONFIGS if c != own)]
        folded = in_proj_conv.folded_config(N, K, 1, H200["multiprocessor_count"])  # the folded form's own bucket
        for candidate in candidates + ([folded] if folded not in candidates else []):
            for norm in (None, torch.ones(K, dtype=dtype)):  # and with the block's RMSNorm folded in (NORM)
                if norm is None and candidate not in candidates:
                    continue
                RECORDER.context = {"tuner": "gemv.forward", "config": config_name(candidate),
                                    "key": gemv.shape_key(N, K, 1, dtype, False) + ("-conv" if norm is None else "-conv-norm"),
                                    "default": candidate == (own if norm is None else folded)}
                try:
                    in_proj_conv.in_proj_conv_step_forward(randn(1, 1, K), randn(N, K), None, randn(D, width), randn(D),
                                                           torch.zeros(1, D, width - 1), True, norm, 1e-6,
                                                           config=candidate)
                except Exception as error:
                    RECORDER.failed(error)
                finally:
                    RECORDER.context = None
    elif file == "greedy_pick":  # the captured decoding step's pick over the lm_head's rows of logits
        vocab = next(iter(params.values()), (32001,))[0]  # a tied head has no weight of its own; V is not compiled in
        picks = torch.zeros(1, seqlen, dtype=torch.long)
        modules["greedy_pick"].greedy_pick_forward(randn(1, vocab), torch.zeros(1, 1, dtype=torch.long), picks,
                                                   torch.tensor(seqlen - 1))
    elif file == "ssd":  # no hook: the training path the Mamba-2 block takes (Δ processed, D, no initial state)
        H, P, N, G, chunk = config["n_heads"], config["head_dim"], config["d_state"], config["n_groups"], config["chunk_size"]
        ssd = modules["ssd"]
        x, dt = randn(1, seqlen, H, P), torch.rand(1, seqlen, H).to(dtype)
        A, B, C, D = -torch.rand(H), randn(1, seqlen, G, N), randn(1, seqlen, G, N), torch.ones(H)
        forward = ssd.ssd_scan_forward(x, dt, A, B, C, chunk, D)
        ssd.ssd_scan_backward(randn(1, seqlen, H, P), None, x, dt, A, B, C, chunk, D, None, None, False, *forward[2:])
        ssd.ssd_scan_forward(x, dt, A, B, C, chunk, D, initial_state=torch.zeros(1, H, P, N))  # a prefill after a cache
    elif file == "gated_delta_rule":  # the decoding step (the hook runs the chunked kernels)
        H, K, HV, V = config["n_heads"], config["head_dim"], config["n_v_heads"], config["head_v_dim"]
        modules["gated_delta_rule"].gated_delta_step_forward(
            torch.zeros(1, HV, K, V), randn(1, H, K), randn(1, H, K), randn(1, HV, V), -torch.rand(1, HV),
            torch.rand(1, HV).to(dtype), K**-0.5)
    else:
        return False
    return True


def probe() -> list[dict]:
    """Compile one small kernel through the stub (the tool's self-test, `--probe`): the recorded rows, as dicts."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _audit_probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n)
        tl.store(y_ptr + offsets, tl.exp(x) * x, mask=offsets < n)

    install_driver()
    x = torch.randn(1000)
    RECORDER.file, RECORDER.case = "probe", "probe"
    _audit_probe_kernel[(4,)](x, torch.empty_like(x), x.numel(), BLOCK=256, num_warps=4)
    return [dataclasses.asdict(row) | {"cases": sorted(row.cases)} for row in RECORDER.rows]


# ---------------------------------------------------------------------------------------------------------------
# Running and the table
# ---------------------------------------------------------------------------------------------------------------


def run_cases(specs: list[Path], seq_lens: list[int] | None, only: set[str] | None, dtype_name: str,
              pdl: bool = False) -> list[str]:
    import torch

    from archgen.emit.tune import tuning_cases
    from archgen.pipeline import compile_spec

    modules = load_kernels(pdl)
    dtype = getattr(torch, dtype_name)
    problems = []
    for spec in specs:
        compiled = compile_spec(spec, None, ())
        max_seq_len = compiled.resolved.model.max_seq_len
        lengths = seq_lens or sorted({256, max_seq_len})
        for case in tuning_cases(compiled.ir, lengths, [1]):
            if only and case.file not in only:
                continue
            RECORDER.case, RECORDER.file = f"{spec.stem}: {case.op} T={case.seqlen}", case.file
            started = time.perf_counter()
            try:
                module = modules[case.file]
                hook = getattr(module, "autotune", None)
                if callable(hook):
                    hook(case.config, case.params, case.batch, case.seqlen, dtype, "cpu")
                if not extra_cases(modules, case.file, case.config, case.params, case.seqlen, dtype) and not hook:
                    raise RuntimeError(f"kernels/{case.file}.py has no autotune hook and the audit no case for it")
            except Exception as error:
                RECORDER.failed(error)
                problems.append(f"{RECORDER.case} ({case.file}): {traceback.format_exc(limit=-3)}")
            print(f"{time.perf_counter() - started:6.1f}s {case.file:24s} {RECORDER.case}", flush=True)
    return problems


def merged_rows() -> list[Row]:
    """One row per (file, tuner, key, config, compiled kernel), the cases that met it merged; a fixed-config launch
    that a tuner's candidate also compiled (the same kernel hash) is left to the tuner's row."""
    merged: dict[tuple, Row] = {}
    for row in RECORDER.rows:
        ident = (row.file, row.tuner, row.key, row.config, row.kernel, row.registers, row.local_bytes, row.spill_stores,
                 row.shared, row.num_warps, row.num_stages, repr(sorted(row.constexprs.items())), row.error)
        if ident in merged:
            merged[ident].cases |= row.cases
        else:
            merged[ident] = dataclasses.replace(row, cases=set(row.cases))
    tuned = {row.hash for row in merged.values() if row.tuner and row.hash}
    rows = [row for row in merged.values() if row.tuner or not row.hash or row.hash not in tuned]
    return sorted(rows, key=lambda r: (r.file, r.tuner, r.key, not r.default, r.config, r.kernel))


ACCEPTED = {
    ("gated_delta_rule.wy", "TILED=1,BLOCK_K=16,BLOCK_V=16,num_warps=1,num_stages=2", "_chunk_wy_tiled_kernel"):
        "the backward's recomputation (STORE_TINV) stores 3-4 registers (16 B); measured the fastest WY config on the "
        "H200 all the same (0.252 ms against the unspilled doubling kernel's 0.426, session 7 call 4; session 9's "
        "backward profile), see kernels/gated_delta_rule.py WY_CONFIGS",
}
"""(tuner, config, kernel) whose small spill a GPU measurement accepted: listed in the table, not a problem."""


def problem(row: Row) -> str:
    """exceeds(row), unless it is an ACCEPTED spill."""
    found = exceeds(row)
    return "" if found == "spills" and (row.tuner, row.config, row.kernel) in ACCEPTED else found


def exceeds(row: Row) -> str:
    """What about a compiled row would fail or slow a launch on the H200: '' when nothing."""
    if row.error:
        return "fails"
    if row.shared is not None and row.shared > H200["max_shared_mem"]:
        return "shared memory"
    if row.spills:
        return "spills"
    return ""


def table(rows: list[Row], never_offered: dict[str, list[str]], command: str, seconds: float) -> str:
    import torch
    import triton

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    head = ["file", "tuner", "shape bucket", "config", "untuned default", "kernel", "variant", "warps/stages", "registers",
            "local (B)", "spill stores", "shared (B)", "problem"]

    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.file, r.tuner, r.key, r.config, r.kernel), []).append(r)

    def variant(r: Row) -> str:
        """The constexprs that tell r from the other specializations of its (tuner, key, config, kernel)."""
        others = groups[(r.file, r.tuner, r.key, r.config, r.kernel)]
        differ = sorted({name for o in others for name, value in o.constexprs.items()
                         if any(x.constexprs.get(name) != value for x in others)})
        return ",".join(f"{name}={r.constexprs[name]}" if name in r.constexprs else f"{name} at run time"
                        for name in differ)

    def render(selected):
        out = [line(head), line(["---"] * len(head))]
        for r in selected:
            out.append(line([r.file, r.tuner or "(fixed config)", r.key, r.config or "-", "yes" if r.default else "",
                             r.kernel, variant(r), f"{r.num_warps}/{r.num_stages}" if r.num_warps else "",
                             "" if r.registers is None else r.registers, "" if r.local_bytes is None else r.local_bytes,
                             "" if r.spill_stores is None else r.spill_stores,
                             "" if r.shared is None else r.shared, r.error or exceeds(r)]))
        return out

    bad_defaults = [r for r in rows if r.default and problem(r)]
    accepted = [r for r in rows if exceeds(r) and not problem(r)]
    bad_candidates = [r for r in rows if not r.default and problem(r)]
    summary = {}
    for r in rows:
        s = summary.setdefault((r.file, r.tuner or "(fixed config)"), {"configs": set(), "kernels": 0, "fails": set(),
                                                                        "spills": set(), "max_regs": 0})
        s["configs"].add((r.key, r.config))
        s["kernels"] += 0 if r.error else 1
        if r.error:
            s["fails"].add((r.key, r.config))
        elif r.spills:
            s["spills"].add((r.key, r.config))
        s["max_regs"] = max(s["max_regs"], r.registers or 0)
    out = [
        "# Every kernel config compiled for the H200 (sm_90)",
        "",
        f"Triton {triton.__version__}, torch {torch.__version__}, target GPUTarget('cuda', {TARGET_ARCH}, 32), "
        f"no GPU: bench/sm90_audit.py's stub driver (how: its docstring and docs/design.md, Kernels). {seconds:.0f} s.",
        "",
        "    " + command,
        "",
        "Shapes: each spec's kernels at batch 1 and the sequence lengths given, through the kernel files' `autotune` "
        "hooks (what `archgen build --autotune` runs) and the audit's own calls for the fixed-config kernels. "
        "A row is one compiled kernel of one candidate config of one shape bucket; `untuned default` marks the config "
        "a package without a tuning table runs. registers and spills as the CUDA driver reports them "
        "(Triton's n_regs; its n_spills is local / 4): local is cuobjdump's STACK + LOCAL, the per-thread local memory, "
        "and spill stores the STL instructions in the SASS (local memory without stores holds no spills); "
        "shared as Triton allocates it (the H200 allows "
        f"{H200['max_shared_mem']} B a block).",
        "",
        "## Untuned defaults that fail or spill",
        "",
        *(render(bad_defaults) if bad_defaults else ["None."]),
        "",
        "## Spills a GPU measurement accepted (`ACCEPTED`)",
        "",
        *([line(["tuner", "config", "kernel", "why"]), line(["---"] * 4)]
          + [line([*k, why]) for k, why in ACCEPTED.items()] if accepted else ["None met."]),
        "",
        "## Other candidates that fail or spill (the tuner skips or times them)",
        "",
        *(render(bad_candidates) if bad_candidates else ["None."]),
        "",
        "## Per tuner",
        "",
        line(["file", "tuner", "(bucket, config) pairs compiled", "kernels compiled", "fail", "spill", "most registers"]),
        line(["---"] * 7),
        *(line([f, t, len(s["configs"]), s["kernels"], len(s["fails"]), len(s["spills"]), s["max_regs"]])
          for (f, t), s in sorted(summary.items())),
        "",
        "## Configs of a space never offered at these shapes (not compiled)",
        "",
        *([f"- {tuner}: {', '.join(configs)}" for tuner, configs in sorted(never_offered.items())] or ["None."]),
        "",
        "## Every compiled kernel",
        "",
        *render(rows),
        "",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the markdown table (default: print it)")
    parser.add_argument("--specs", nargs="*", type=Path)
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated sequence lengths (default: 256 and each spec's max_seq_len)")
    parser.add_argument("--only", type=lambda s: set(s.split(",")), default=None, help="kernel files, comma-separated")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--pdl", action="store_true",
                        help="compile the kernels as an H200 launches them with programmatic dependent launch on "
                             "(triton_support.programmatic_launch: their gdc calls in, launch_pdl set)")
    parser.add_argument("--probe", action="store_true", help="compile one small kernel and print its row as JSON")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe()))
        return
    started = time.perf_counter()
    install_driver()
    specs = args.specs or [p.relative_to(ROOT) for pattern in DEFAULT_SPECS for p in sorted(ROOT.glob(pattern))]
    problems = run_cases(specs, args.seq_lens, args.only, args.dtype, args.pdl)
    from archgen_kernels.triton_support import TUNERS, config_name

    never = {name: [config_name(c) for c in tuner.configs if config_name(c) not in OFFERED.get(name, ())]
             for name, tuner in TUNERS.items() if not args.only or name in OFFERED}
    rows = merged_rows()
    command = "PYTHONPATH=$PWD /work/t36torch/bin/python " + " ".join(["bench/sm90_audit.py", *sys.argv[1:]])
    text = table(rows, {k: v for k, v in never.items() if v}, command, time.perf_counter() - started)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text)
    for failed in problems:
        print(failed, file=sys.stderr)
    bad = [r for r in rows if r.default and problem(r)]
    print(f"{len(rows)} rows, {len(bad)} untuned defaults that fail or spill, {len(problems)} cases that failed",
          file=sys.stderr)
    sys.exit(1 if bad or problems else 0)


if __name__ == "__main__":
    main()
