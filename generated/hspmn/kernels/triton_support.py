"""What every Triton kernel file of archgen_kernels shares: the interpreter, autotuning with pinned winners, and the
registration of custom ops. Op files import it relatively (`from .triton_support import ...`), so the same files
work as the package archgen_kernels and as the kernels/ folder copied into a generated package.

Interpreter. Under TRITON_INTERPRET=1 (set before triton is imported) kernels run on CPU tensors in Triton's
interpreter, slowly: that is how the tests run without a GPU. `interpreting()` says whether that is the case,
`triton_on_cpu()` whether CPU tensors should take the kernels at all (the kernel tests ask for it), and importing
this module under the interpreter patches it to run loops with runtime bounds under numpy >= 2.4.

Autotuning. An `Autotuner` chooses one launch config per shape bucket (a key string the op builds from the sizes
that matter and the dtype). On the first call with a key it times every candidate on that call's own tensors and
keeps the fastest, unless the choice is pinned: `pin` sets choices directly, and a tuning table (`tuning_table` /
`load_tuning_table`, and a `tuning.json` next to this file, read at import) pins the winners recorded for this GPU,
torch and triton. A table entry for another GPU or other versions is ignored, never applied.

Op registration. `register_op` defines `archgen_v1::<name>` with torch.library once per process: a second copy of
an op file (a generated package's kernels/ next to archgen_kernels) reuses the ops the first registered, since
registering a name twice corrupts the dispatcher. The namespace is versioned: a change of an op's signature or
semantics moves it to archgen_v2, so packages generated before and after can run in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import triton
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


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return isinstance(_probe, InterpretedFunction)


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
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------------------------


def config_name(config: dict) -> str:
    return ",".join(f"{name}={value}" for name, value in config.items())


class Autotuner:
    """Chooses the launch config (e.g. {"BLOCK_D": 32, "num_warps": 4}) of one kernel per shape bucket.

    `name` is "<op>.<kernel>" (e.g. "selective_scan.forward"): tuning tables are keyed by it, and the last tuner
    created under a name is the one `tuning_table` reads and `load_tuning_table` pins.
    Not triton.autotune: that keys on the dtype of every tensor argument, and an absent optional input (None) has
    none, so each combination of present inputs would be tuned, and all its configs compiled, anew; here those
    variants share one choice and compile only the winner. `chosen` and `timings` record what was chosen and why.
    Tuning launches the kernel many times: do it before a CUDA graph capture, or pin the configs.
    """

    def __init__(self, name: str, configs: list[dict], interpreter_config: dict):
        self.name = name
        self.configs = configs
        self.interpreter_config = interpreter_config  # used when interpreting: the interpreter has nothing to tune
        self.chosen: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}
        TUNERS[name] = self
        self.pin(_PINNED.get(name, {}))

    def tune(self, key: str, launch: Callable[[dict], None], candidates: list[dict] | None = None) -> dict:
        """Time launch(config) for every candidate (default: all configs) and keep the fastest; a config that fails
        to compile or run (out of registers, shared memory) is recorded with its error and skipped."""
        from triton.testing import do_bench

        candidates = self.configs if candidates is None else candidates
        timings = {}
        for config in candidates:
            try:
                timings[config_name(config)] = float(do_bench(lambda config=config: launch(config), warmup=5, rep=25,
                                                              return_mode="median"))
            except Exception as error:  # one config failing must not fail the op: the others may run
                timings[config_name(config)] = f"{type(error).__name__}: {error}"[:300]
        ran = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
        if not ran:
            raise RuntimeError(f"no config of the {self.name} kernel ran for {key}: {timings}")
        best = next(c for c in candidates if config_name(c) == min(ran, key=ran.get))
        self.chosen[key] = best
        self.timings[key] = timings
        return best

    def pin(self, choices: dict[str, dict]) -> None:
        """Use these {key: config} choices untimed (config values are ints)."""
        self.chosen.update({key: {name: int(value) for name, value in config.items()} for key, config in choices.items()})

    def known(self, key: str, explicit: dict | None = None) -> dict | None:
        """The config to run without tuning: the explicit one, the interpreter's, or the chosen one; else None."""
        if explicit is not None:
            return dict(explicit)
        if interpreting():
            return self.interpreter_config
        return self.chosen.get(key)


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


def register_op(name: str, impl: Callable, fake: Callable, *, backward: Callable | None = None,
                setup_context: Callable | None = None):
    """torch.library.custom_op `archgen_v1::<name>` with its fake implementation (and autograd when `backward` is
    given), once per process: when the op exists already (another copy of the op file registered it), that op is
    returned and nothing is registered."""
    namespace = getattr(torch.ops, OP_NAMESPACE)
    if hasattr(namespace, name):
        return getattr(namespace, name)
    op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def op_overload(name: str):
    """The registered `archgen_v1::<name>` overload (the key of decomposition tables)."""
    return getattr(getattr(torch.ops, OP_NAMESPACE), name).default
