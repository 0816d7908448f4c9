"""What every Triton kernel file of archgen_kernels shares: the interpreter, autotuning with pinned winners, the
registration of custom ops, and the jit helpers several kernels call (`softplus`, `sigmoid`). Op files import it relatively
(`from .triton_support import ...`), so the same files work as the package archgen_kernels and as the kernels/ folder
copied into a generated package.

Interpreter. Under TRITON_INTERPRET=1 (set before triton is imported) kernels run on CPU tensors in Triton's
interpreter, slowly: that is how the tests run without a GPU. `interpreting()` says whether that is the case,
`triton_on_cpu()` whether CPU tensors should take the kernels at all (the kernel tests ask for it), and importing
this module under the interpreter patches it to run loops with runtime bounds under numpy >= 2.4.

Autotuning. An `Autotuner` chooses one launch config per shape bucket (a key string the op builds from the sizes
that matter and the dtype). A choice is pinned (`pin`, or a tuning table: `tuning_table` / `load_tuning_table`, and a
`tuning.json` next to this file, read at import, with the winners recorded for this GPU, torch and triton; an entry
for another GPU or other versions is ignored, never applied) or made on the first call with a key. What that first
call does is `RUNTIME_TUNING`'s choice: time every candidate on the call's own tensors and keep the fastest (True,
archgen_kernels' default: the benches and tests), or run the tuner's default config and say so once per process
(False: a generated package sets it, so that importing or running it never tunes). Inside `tuning_session()` (what
`archgen build --autotune` runs each kernel's `autotune` hook in) every new key is timed, even under the interpreter
(with its one config), and the session's `table()` is what was tuned there.

Programmatic dependent launch. `programmatic_launch(device)` says whether launches on a device let the next kernel
start before the one ahead has finished (Hopper's PDL; off unless ARCHGEN_PDL=1 or `set_programmatic_launch(True)`:
it measured slower); `gdc_wait` / `gdc_launch_dependents` are the kernels' side of it, and `prefetch_l2` lets a
kernel ask for what it will read before it waits (docs/design.md, Kernels).

Op registration. `register_op` defines `archgen_v1::<name>` with torch.library once per process: a second copy of
an op file (a generated package's kernels/ next to archgen_kernels) reuses the ops the first registered, since
registering a name twice corrupts the dispatcher. The namespace is versioned: a change of an op's signature or
semantics moves it to archgen_v2, so packages generated before and after can run in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a triton without the interpreter: never interpreting
    InterpretedFunction = ()

OP_NAMESPACE = "archgen_v1"
TUNING_TABLE_FORMAT = 1
TUNING_FILE = Path(__file__).with_name("tuning.json")


# ---------------------------------------------------------------------------------------------------------------
# Interpreter
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _probe():
    pass


_INTERPRETING = isinstance(_probe, InterpretedFunction)


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported). A constant:
    torch 2.11's dynamo cannot trace isinstance on a compiled-mode JIT function (TritonKernelVariable), so compiling
    a model's layers on CPU tensors on a GPU machine failed in the kernels' `triton_on_cpu` check (H200, session 15)."""
    return _INTERPRETING


HARDWARE_MATH: tl.constexpr = tl.constexpr(not interpreting())
"""Whether jit helpers may use the GPU's approximate instructions through inline PTX (`sigmoid`): not in the
interpreter, which runs no PTX."""

_TRUNCATING_BFLOAT16: tl.constexpr = tl.constexpr(interpreting())
"""Whether value.to(tl.bfloat16) truncates float32 (toward zero) instead of rounding to nearest even as the GPU does:
the interpreter's conversion does (measured on triton 3.9: half of random values one ulp off torch's, every one
toward zero, which doubles a bf16 result's error and biases it). See `rounded`."""


def triton_on_cpu() -> bool:
    """Whether CPU tensors run the Triton kernels (in the interpreter) rather than the op's reference.

    Only when interpreting and ARCHGEN_TRITON_ON_CPU=1, read at every call: the kernel tests ask for it. Otherwise
    an op computes CPU tensors with its reference, which is what an exported program holding the op does when it
    runs on a CPU (the interpreter would take seconds per call)."""
    return interpreting() and os.environ.get("ARCHGEN_TRITON_ON_CPU") == "1"


def _fix_interpreter_scalars() -> None:
    """Let Triton's interpreter run loops with runtime bounds under numpy >= 2.4.

    The interpreter holds a scalar as a numpy array of shape (1,) and converts it with int(array), which numpy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"), so `for i in range(n)` fails for a
    runtime n. Its launch-time patch of tl.tensor.__index__ is wrapped to convert with .item() instead; the
    interpreter restores patched attributes last-in first-out, so both are undone after each launch.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "archgen_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.archgen_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _fix_interpreter_scalars()


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------------


def strided(t: Tensor | None, ndim: int) -> tuple:
    """(tensor or None, *strides): a kernel's pointer and stride arguments; an absent tensor gets zero strides."""
    return (t, *t.stride()) if t is not None else (None, *(0,) * ndim)


def on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it t's. Nothing to enter when it already is, the common case:
    entering torch.cuda.device is host time on every launch, and small ops' launches set the pace (kernels/rmsnorm.py,
    _EagerRMSNorm)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _environment_allows_pdl() -> bool:
    # Off unless ARCHGEN_PDL=1: on the H200 it made batch-1 decoding slower (gpu11: Bamba-1B 0.961 against 0.888
    # ms/token, Hymba+ 2.330 against 2.286; docs/design.md, "Programmatic dependent launch")
    return os.environ.get("ARCHGEN_PDL", "0") == "1"


try:  # the grid dependency control of triton >= 3.4 (griddepcontrol.wait / .launch_dependents, sm_90+)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older triton: no programmatic launches (programmatic_launch says False), and no-op helpers
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass
else:
    _HAS_GDC = True

_PDL_ALLOWED = _environment_allows_pdl()  # set_programmatic_launch's choice, else ARCHGEN_PDL's at import
_SM90_DEVICES: dict[int, bool] = {}  # CUDA device index -> compute capability >= 9


def set_programmatic_launch(on: bool | None) -> None:
    """Allow (True) or forbid (False) programmatic dependent launches in this process from the next launch on, or
    (None) go back to what ARCHGEN_PDL says (read again now). For a same-process A/B (bench/decode.py --pdl-ab): a
    CUDA graph keeps the launches it recorded, so re-capture after flipping it."""
    global _PDL_ALLOWED
    _PDL_ALLOWED = _environment_allows_pdl() if on is None else bool(on)


def programmatic_launch(device: torch.device) -> bool:
    """Whether kernels launched on `device` use programmatic dependent launch (PDL): a kernel so launched may start
    while the kernel ahead of it in the stream still runs, once every program of that one has executed
    gdc_launch_dependents (or exited), and must execute gdc_wait before it reads what an earlier kernel wrote or
    writes anything. True on CUDA devices of compute capability 9 or more (Hopper), not under the interpreter (it
    runs no PTX), with a triton that has the gdc helpers, when ARCHGEN_PDL=1 or set_programmatic_launch(True) (off by
    default: it measured slower on the H200).
    Kernels take it as their PDL constexpr (which gates their gdc calls) and as the launch's `launch_pdl`.
    Called on every launch: the capability is cached per device."""
    if not (_PDL_ALLOWED and _HAS_GDC) or device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    sm90 = _SM90_DEVICES.get(index)
    if sm90 is None:
        sm90 = _SM90_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return sm90


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------------------
# Math shared by kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), never overflowing; log1p(w) = log(1 + w) · w / ((1 + w) - 1) keeps
    w where 1 + w rounds to 1 (Goldberg's trick; triton.language has no log1p). For the SSM step sizes Δ."""
    w = tl.exp(-tl.abs(x))
    one_plus_w = 1.0 + w
    log1p_w = tl.where(one_plus_w == 1.0, w, tl.log(one_plus_w) * w / (one_plus_w - 1.0))
    return tl.maximum(x, 0.0) + log1p_w


_WIDENED_HALF_DOT: tl.constexpr = tl.constexpr(interpreting())
"""Whether `dot` widens its operands to float32 first: the interpreter multiplies bfloat16 operands as the integers
it stores them as."""


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """a @ b (+ acc, or None) in float32 at DOT_PRECISION. Under the interpreter (_WIDENED_HALF_DOT) the already
    rounded operands are widened to float32 first: the same products the tensor cores form."""
    if _WIDENED_HALF_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def rounded(value, ty: tl.constexpr):
    """value.to(ty), rounded to nearest even as the GPU converts. Under the interpreter (_TRUNCATING_BFLOAT16) the
    float32 bits are rounded first, so that its truncating conversion to bfloat16 is then exact: kernel tests see
    the GPU's bf16 rounding, not twice its error all of one sign."""
    if _TRUNCATING_BFLOAT16 and ty == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    return value.to(ty)


@triton.jit
def prefetch_l2(pointers):
    """Bring the lines holding `pointers` (addresses that must lie inside their tensor) into L2, holding no register
    until they arrive: PTX prefetch.global.L2, one instruction per element (pass one pointer per 128-byte line).
    Under the interpreter: nothing."""
    if HARDWARE_MATH:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pointers], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) of float32 x with one approximate exp2 and one approximate reciprocal (ex2.approx, rcp.approx:
    about 2 ulp): tl.sigmoid's exp and IEEE-rounded division take 14 instructions an element on sm_90, and a SiLU
    backward that recomputes it is instruction-bound (the conv1d window backward). 1 for x → +inf, 0 for x → -inf.
    Under the interpreter: tl.sigmoid."""
    if HARDWARE_MATH:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 e; mul.f32 e, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 e, e; add.f32 e, e, 0f3F800000; "
            "rcp.approx.ftz.f32 $0, e; }",  # 0fBFB8AA3B = -log2(e), 0f3F800000 = 1
            "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sigmoid(x)


# ---------------------------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------------------------


def config_name(config: dict) -> str:
    return ",".join(f"{name}={value}" for name, value in config.items())


RUNTIME_TUNING = True
"""True: a shape bucket without a pinned config is tuned on its first call. False: it runs the tuner's default
config, with a warning once per process (generated packages: kernels/__init__.py sets it)."""


class Autotuner:
    """Chooses the launch config (e.g. {"BLOCK_D": 32, "num_warps": 4}) of one kernel per shape bucket.

    `name` is "<op>.<kernel>" (e.g. "selective_scan.forward"): tuning tables are keyed by it, and the last tuner
    created under a name is the one `tuning_table` reads and `load_tuning_table` pins.
    Not triton.autotune: that keys on the dtype of every tensor argument, and an absent optional input (None) has
    none, so each combination of present inputs would be tuned, and all its configs compiled, anew; here those
    variants share one choice and compile only the winner. `chosen` and `timings` record what was chosen and why;
    `defaulted` the buckets that ran the default config untuned (RUNTIME_TUNING off).
    Tuning launches the kernel many times: do it before a CUDA graph capture, or pin the configs.
    `default`: the config an untuned bucket runs when RUNTIME_TUNING is off (when it is among the candidates of that
    call; otherwise the first candidate, so a launcher orders its candidates with the soundest first).
    """

    def __init__(self, name: str, configs: list[dict], interpreter_config: dict, default: dict | None = None):
        self.name = name
        self.configs = configs
        self.interpreter_config = interpreter_config  # used when interpreting: the interpreter has nothing to tune
        self.default = default
        self.chosen: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}
        self.defaulted: dict[str, dict] = {}
        TUNERS[name] = self
        self.pin(_PINNED.get(name, {}))

    def tune(self, key: str, launch: Callable[[dict], None], candidates: list[dict] | None = None) -> dict:
        """Time launch(config) for every candidate (default: all configs) and keep the fastest; a config that fails
        to compile or run (out of registers, shared memory) is recorded with its error and skipped. With
        RUNTIME_TUNING off and no tuning session, times nothing: returns the default config (see the class)."""
        candidates = self.configs if candidates is None else candidates
        if not (RUNTIME_TUNING or _SESSION.active):
            return self._untuned(key, candidates)
        if interpreting():  # a session under the interpreter: the plumbing runs, with the one config it can run
            candidates = [self.interpreter_config]
        timings = {}
        for config in candidates:
            try:
                timings[config_name(config)] = _time_ms(lambda config=config: launch(config))
            except Exception as error:  # one config failing must not fail the op: the others may run
                timings[config_name(config)] = f"{type(error).__name__}: {error}"[:300]
        ran = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
        if not ran:
            raise RuntimeError(f"no config of the {self.name} kernel ran for {key}: {timings}")
        best = next(c for c in candidates if config_name(c) == min(ran, key=ran.get))
        self.chosen[key] = best
        self.timings[key] = timings
        if _SESSION.active:
            _SESSION.tuned.append((self.name, key, dict(best), ran[config_name(best)]))
        return best

    def untuned_config(self, candidates: list[dict]) -> dict:
        """What a GPU runs untuned among this call's candidates: the default when among them, else the first (the
        kernel tests' `gpu_configs` mode runs it under the interpreter too)."""
        return self.default if self.default in candidates else candidates[0]

    def _untuned(self, key: str, candidates: list[dict]) -> dict:
        config = self.interpreter_config if interpreting() else self.untuned_config(candidates)
        self.defaulted[key] = dict(config)
        _warn_untuned(self.name, key, config)
        return config

    def pin(self, choices: dict[str, dict]) -> None:
        """Use these {key: config} choices untimed (config values are ints)."""
        self.chosen.update({key: {name: int(value) for name, value in config.items()} for key, config in choices.items()})

    def known(self, key: str, explicit: dict | None = None) -> dict | None:
        """The config to run without tuning: the explicit one, the chosen (pinned or tuned) one, the default one an
        earlier call of this bucket ran, or, interpreting outside a session, the interpreter's; else None."""
        if explicit is not None:
            return dict(explicit)
        if key in self.chosen:
            return self.chosen[key]
        if key in self.defaulted:
            return self.defaulted[key]
        if interpreting() and RUNTIME_TUNING and not _SESSION.active:
            return self.interpreter_config
        return None


GRAPH_TIMED_MS = 0.2
"""Launches shorter than this on the GPU are timed from CUDA graphs (_graph_time_ms): a decoding step's kernels take
3-40 µs, less than the host takes to launch them, so eager timing measured the host. Session 18, H200: every decoding
GEMV of Hymba+ timed eagerly at 5-42 µs, the winners picked by host noise, and the step tuned so ran 1.839 ms a token
against 1.647 with the untuned defaults (bench/results/decode_autotune_eager_timing_s18.h200.json)."""
L2_FLUSH_BYTES = 128 * 2**20
"""Written before each timed launch, more than any GPU's L2 (H100/H200: 50-60 MB): the launch reads its weights from
memory, as a decoding step does, not from the L2 the previous launch filled."""


def _time_ms(run: Callable[[], None]) -> float:
    """Median milliseconds of run() on the GPU (short launches from CUDA graphs, see GRAPH_TIMED_MS); under the
    interpreter one timed run (the plumbing, not a measurement)."""
    if interpreting():
        started = time.perf_counter()
        run()
        return (time.perf_counter() - started) * 1e3
    from triton.testing import do_bench

    eager = float(do_bench(run, warmup=5, rep=25, return_mode="median"))
    if eager >= GRAPH_TIMED_MS:
        return eager
    try:
        return _graph_time_ms(run)
    except Exception:  # noqa: BLE001 — a launcher that cannot be recorded (a host sync) keeps its eager timing
        return eager


def _graph_time_ms(run: Callable[[], None], launches: int = 8, replays: int = 7) -> float:
    """Milliseconds of one run() from CUDA graphs: a graph of `launches` × (an L2 flush, run()) against one of the
    flushes alone, each replayed `replays` times, the medians' difference over `launches`."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def recorded(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                flush.zero_()
                body()
        return graph

    def median_ms(graph: torch.cuda.CUDAGraph) -> float:
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    torch.cuda.synchronize()
    with_run, flushes = recorded(run), recorded(lambda: None)
    with_run.replay()  # the first replay uploads the graph
    flushes.replay()
    return max(median_ms(with_run) - median_ms(flushes), 0.0) / launches


UNTUNED: dict[tuple[str, str], dict] = {}
"""{(tuner name, key): default config} of every bucket that ran untuned in this process (RUNTIME_TUNING off)."""


def _warn_untuned(name: str, key: str, config: dict) -> None:
    """Say once per process that kernels run untuned defaults (UNTUNED lists every bucket that did)."""
    first = not UNTUNED
    UNTUNED[(name, key)] = dict(config)
    if first:
        here = environment()
        warnings.warn(
            f"archgen kernels: no tuned config for {name} at {key} on {here['gpu']} (torch {here['torch']}, triton "
            f"{here['triton']}): running the default {config_name(config)}. This package's kernels/tuning.json has "
            f"no entry for this GPU and shape; rebuild it with `archgen build SPEC --autotune` on this GPU (with "
            f"--tune-seq-len / --tune-batch for these shapes) to pin tuned configs. Said once per process; "
            f"kernels.triton_support.UNTUNED lists every untuned shape.", RuntimeWarning, stacklevel=3)


class _Session:
    active = False
    tuned: list[tuple[str, str, dict, float]] = []  # (tuner, key, winner, its milliseconds)


_SESSION = _Session()


@contextlib.contextmanager
def tuning_session():
    """Within it, every shape bucket the kernels meet is timed and chosen (RUNTIME_TUNING and earlier choices
    aside: the tuners start empty); yields a function returning the table of the choices made inside. The tuners'
    earlier choices come back afterwards. Under the interpreter each bucket "tunes" its interpreter config: the
    plumbing, testable on a CPU."""
    saved = {name: (tuner.chosen, tuner.timings, tuner.defaulted) for name, tuner in TUNERS.items()}
    for tuner in TUNERS.values():
        tuner.chosen, tuner.timings, tuner.defaulted = {}, {}, {}
    _SESSION.active, _SESSION.tuned = True, []
    tuned = _SESSION.tuned

    def table() -> dict:
        here = environment()
        winners = {(name, key): (config, ms) for name, key, config, ms in tuned}  # a bucket tuned twice: the last
        entries = [{**here, "kernel": name, "key": key, "config": config, "ms": round(ms, 4)}
                   for (name, key), (config, ms) in sorted(winners.items())]
        return {"format": TUNING_TABLE_FORMAT, "entries": entries}

    try:
        yield table
    finally:
        _SESSION.active = False
        for name, (chosen, timings, defaulted) in saved.items():
            TUNERS[name].chosen, TUNERS[name].timings, TUNERS[name].defaulted = chosen, timings, defaulted


TUNERS: dict[str, Autotuner] = {}
_PINNED: dict[str, dict[str, dict]] = {}  # {tuner name: {key: config}} from tables loaded so far, for this machine


def environment() -> dict:
    """What a tuning table's winners depend on: the GPU (the current device's name), torch and triton versions."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__.split("+")[0], "triton": triton.__version__}


def tuning_table() -> dict:
    """Every choice made or pinned so far in this process, as a JSON-ready table for this GPU and these versions."""
    entries = [{**environment(), "kernel": tuner.name, "key": key, "config": dict(config)}
               for tuner in TUNERS.values() for key, config in sorted(tuner.chosen.items())]
    return {"format": TUNING_TABLE_FORMAT, "entries": entries}


def load_tuning_table(table: dict | str | Path) -> int:
    """Pin the winners of `table` (a `tuning_table()` result, or a JSON file of one) that were measured on this GPU
    with these torch and triton versions, in the autotuners that exist and in those created later. Returns how many
    entries applied; entries for another GPU or other versions are skipped, never applied."""
    if not isinstance(table, dict):
        table = json.loads(Path(table).read_text(encoding="utf-8"))
    if table.get("format") != TUNING_TABLE_FORMAT:
        raise ValueError(f"tuning table format {table.get('format')!r}; this archgen reads format {TUNING_TABLE_FORMAT}")
    here = environment()
    applied = 0
    for entry in table.get("entries", []):
        if any(entry.get(field) != value for field, value in here.items()):
            continue
        _PINNED.setdefault(entry["kernel"], {})[entry["key"]] = entry["config"]
        if entry["kernel"] in TUNERS:
            TUNERS[entry["kernel"]].pin({entry["key"]: entry["config"]})
        applied += 1
    return applied


if TUNING_FILE.is_file():
    load_tuning_table(TUNING_FILE)


# ---------------------------------------------------------------------------------------------------------------
# Op registration
# ---------------------------------------------------------------------------------------------------------------


def calls_implementation_directly(t: Tensor) -> bool:
    """Whether an op file may skip its custom op and call the implementation through a torch.autograd.Function: in
    eager mode, with data to launch on. The custom op's dispatch cost more host time than the kernels took on the H200
    (RMSNorm: 0.59 ms a call for 0.39 ms of kernels); torch.compile and torch.export must see the custom op, and on
    the meta device its fake implementation runs (archgen.benchmark.decode_step_ops counts a model's ops there)."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or t.is_meta)


def register_op(name: str, impl: Callable, fake: Callable, *, backward: Callable | None = None,
                setup_context: Callable | None = None, namespace: str = OP_NAMESPACE,
                mutates_args: tuple[str, ...] = ()):
    """torch.library.custom_op `archgen_v1::<name>` with its fake implementation (and autograd when `backward` is
    given; torch allows none for an op that mutates its inputs, `mutates_args`), once per process: when the op exists
    already (another copy of the op file registered it), that op is returned and nothing is registered. An op whose
    signature or meaning changed passes the next namespace (archgen_v2), so that a package generated before the
    change keeps its own op in the same process."""
    registered = getattr(torch.ops, namespace)
    if hasattr(registered, name):
        return getattr(registered, name)
    op = torch.library.custom_op(f"{namespace}::{name}", impl, mutates_args=mutates_args)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def op_overload(name: str, namespace: str = OP_NAMESPACE):
    """The registered `archgen_v1::<name>` overload (the key of decomposition tables)."""
    return getattr(getattr(torch.ops, namespace), name).default
