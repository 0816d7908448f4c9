"""The kernel tests' GPU-configs mode: run a kernel's ops under the interpreter at the launch configs a GPU runs.

Under the interpreter every Autotuner launches its one `interpreter_config` (small blocks, cheap to interpret); on a
GPU a kernel runs its untuned choice (`Autotuner.untuned_config`: the default when among the call's candidates,
else the first) or whichever candidate tuning timed fastest, so tests at the interpreter config alone never run what
a GPU launches (session 9: the SSD's 64-row fallback block on a 32-row chunk wrote NaN on the H200). A test
parametrized with `choice` in `gpu_choices(n)` takes the `gpu_configs` fixture (tests/kernels/conftest.py):

    @pytest.mark.parametrize("choice", gpu_choices(3))
    def test_every_gpu_config(gpu_configs, choice):
        gpu_configs.choose(choice)
        with gpu_configs.named():
            check(...)          # the ops against their reference, as the module's other tests do

`choose` replaces Autotuner.known / tune for the test: each launch picks, from the candidates its launcher passes
for the call's shape, the untuned choice or the choice's index among the others (clamped), and records it.
"""

import contextlib
from dataclasses import dataclass

import pytest

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
"""Config fields that only say how the GPU runs a program: the interpreter runs configs that differ only in these
the same way, so the mode counts them as one candidate."""


@dataclass(frozen=True)
class GpuChoice:
    """Which config each tuner launches: `index` None is the GPU's untuned choice (Autotuner.untuned_config), else
    the index-th of the call's other candidates (those that run differently from it in the interpreter; with
    `covering`, those of a covering set), clamped to the last. `count` is how many indices the test runs: a tuner
    with more other candidates than that fails the test, so a space that grows is never left half tested."""

    index: int | None
    count: int
    covering: bool = False

    def __str__(self) -> str:
        return "untuned" if self.index is None else f"{'covering' if self.covering else 'candidate'}{self.index}"


def gpu_choices(count: int, covering: bool = False) -> list:
    """The parameters of a test that runs a kernel's ops under every config a GPU may launch: the untuned choice,
    then the other candidates 0 .. count - 1 (count: the most other candidates, or covering ones, that any tuner of
    the ops has at the test's shapes)."""
    choices = [GpuChoice(None, count, covering), *(GpuChoice(i, count, covering) for i in range(count))]
    return [pytest.param(choice, id=str(choice)) for choice in choices]


def per_case(cases: dict[str, tuple], counts: dict[str, int], covering: bool = False) -> list:
    """Parameters (*case, choice) for cases whose tuners have different numbers of candidates: each case with
    gpu_choices(counts[id]), ids "<case id>-<choice>"."""
    return [pytest.param(*case, choice.values[0], id=f"{name}-{choice.id}")
            for name, case in cases.items() for choice in gpu_choices(counts[name], covering)]


def kernel_fields(config: dict) -> tuple:
    """What of a config changes what the interpreter runs: every field but the launch options."""
    return tuple(sorted((k, v) for k, v in config.items() if k not in LAUNCH_OPTIONS))


def distinct(candidates: list[dict]) -> list[dict]:
    """The candidates that run differently in the interpreter (the first of each, in order)."""
    seen, kept = set(), []
    for config in candidates:
        if kernel_fields(config) not in seen:
            seen.add(kernel_fields(config))
            kept.append(config)
    return kept


def covering_set(candidates: list[dict]) -> list[dict]:
    """The first candidate, then each next one that brings a value of some field (launch options aside; a field a
    config lacks counts as the value None) that none kept so far has: between them they take every value of every
    field, in fewer launches than all the candidates."""
    fields = {k for config in candidates for k in config if k not in LAUNCH_OPTIONS}
    taken, kept = set(), []
    for config in distinct(candidates):
        values = {(k, config.get(k)) for k in fields}
        if not kept or not values <= taken:
            kept.append(config)
            taken |= values
    return kept


class GpuConfigs:
    """The `gpu_configs` fixture: `choose(choice)` makes every Autotuner pick its config as a GPU does, from the
    candidates its launcher passes for the call's shape (so its shape filters run), instead of the interpreter's one
    config: the untuned choice, or one of the other candidates (GpuChoice). Explicit configs (a launcher's
    `config=`) still win; pinned and earlier choices are ignored, so every launch picks afresh. `launched` records
    each tuner's configs; `named()` adds them to any error raised inside it, so a failure names the configs besides
    the kernel, the shape and the choice in the test's id."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.launched: dict[str, list[dict]] = {}

    def choose(self, choice: GpuChoice) -> "GpuConfigs":
        from archgen_kernels import triton_support

        def known(tuner, key, explicit=None):
            return dict(explicit) if explicit is not None else None

        def tune(tuner, key, launch, candidates=None):
            candidates = tuner.configs if candidates is None else candidates
            untuned = tuner.untuned_config(candidates)
            others = [c for c in distinct(candidates) if kernel_fields(c) != kernel_fields(untuned)]
            if choice.covering:
                others = covering_set([untuned, *others])[1:]
            assert len(others) <= choice.count, (
                f"{tuner.name} has {len(others)} {'covering' if choice.covering else 'other'} candidates at {key}, "
                f"the test runs {choice.count}: raise its count")
            if choice.index is None or not others:
                config = untuned
            else:
                config = others[min(choice.index, len(others) - 1)]
            self.launched.setdefault(tuner.name, []).append(dict(config))
            return config

        self.monkeypatch.setattr(triton_support.Autotuner, "known", known)
        self.monkeypatch.setattr(triton_support.Autotuner, "tune", tune)
        return self

    def describe(self) -> str:
        from archgen_kernels.triton_support import config_name

        lines = [f"{name}: {'; '.join(config_name(c) for c in distinct(configs))}"
                 for name, configs in self.launched.items()]
        return "\n".join(lines) or "no tuner launched"

    @contextlib.contextmanager
    def named(self):
        """Name the configs launched so far in any error raised inside."""
        try:
            yield self
        except Exception as error:
            error.add_note(f"configs launched:\n{self.describe()}")
            raise


