"""Shared fixtures: build a spec into a temporary directory and import the generated package on its own."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Generated packages import their Triton kernels; without a GPU they can only run in Triton's interpreter, which
    # must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every compile in the tests checks the IR after lowering and after each pass (archgen/passes/verify.py).
os.environ.setdefault("ARCHGEN_VERIFY_IR", "1")

from archgen.passes.cost import cost_report, parameter_table
from archgen.resources import kernels_package
from archgen.testing import build_generated
from tests.numerics import assert_close

kernels_package()  # `import archgen_kernels` finds this checkout's kernels/ (it imports no triton)

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def build_package(spec_path: Path | str, out_root: Path, preset: str | None = "tiny", overrides: tuple[str, ...] = ()):
    """Compile and emit `spec_path` into out_root/<name>/ and import it; returns the imported package."""
    return build_generated(spec_path, out_root, preset, overrides)[0]


def build_spied_package(spec_path: Path | str, out_root: Path, monkeypatch, kernel_functions: tuple[str, ...],
                        overrides: tuple[str, ...] = (), preset: str | None = None):
    """Build and import the package of `spec_path` (with `preset`, default none) with the named kernel functions run in Triton's
    interpreter (CPU tensors through the kernels, not their CPU fallbacks) and spied on: package.calls counts each
    one's calls. A name is a function of the package's kernels module or of one of its kernel files
    ("state_update_module.mamba2_step_", counted as "mamba2_step_"). Skips the test when triton does not import, or
    where its kernels do not run in the interpreter (a GPU machine)."""
    pytest.importorskip("triton")
    from archgen_kernels.triton_support import interpreting

    if not interpreting():  # a GPU machine: the CUDA tests (test_kernels.py, bench/) cover it
        pytest.skip("runs the kernels in Triton's interpreter on CPU tensors, which this machine (a GPU) does not use")
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")
    package = build_package(spec_path, out_root, preset=preset, overrides=overrides)
    spied = {}
    for name in kernel_functions:
        owner_name, _, function = name.rpartition(".")
        owner = getattr(package.kernels, owner_name) if owner_name else package.kernels
        spied[function] = (owner, getattr(owner, function) if owner is not None else None)
    if any(kernel is None for _, kernel in spied.values()):
        pytest.skip("triton did not import")
    if not torch.cuda.is_available():  # the kernels take CPU tensors only in Triton's interpreter
        monkeypatch.setattr(package.model, "use_kernel",
                            lambda kernel, x: package.model.USE_KERNELS and kernel is not None)
    package.calls = Counter()
    for function, (owner, kernel) in spied.items():

        def counted(*args, kernel=kernel, function=function, **kwargs):
            package.calls[function] += 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(owner, function, counted)
    return package


def assert_kernels_match_references(package, model, tokens: torch.Tensor, *, reseed: int | None = None) -> None:
    """One next-token loss and backward with the package's kernels, then one with its references (USE_KERNELS), from
    the same weights: logits within 1e-5 and every parameter's gradient within 1e-4 (float32). `reseed` draws the same
    random numbers in both passes for a model that samples. Leaves the kernels on."""
    results = {}
    for use in (True, False):
        package.model.USE_KERNELS = use
        model.zero_grad(set_to_none=True)
        if reseed is not None:
            torch.manual_seed(reseed)
        out = model(tokens[:, :-1], targets=tokens[:, 1:])
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[use] = (out.logits.detach(), grads)
    package.model.USE_KERNELS = True
    assert_close(results[True][0], results[False][0], 1e-5, "logits")
    assert results[True][1].keys() == results[False][1].keys(), "the same parameters get gradients"
    for name, grad in results[True][1].items():
        assert_close(grad, results[False][1][name], 1e-4, f"grad of {name}")


def assert_parameters_match_the_cost_model(model, ir) -> None:
    """The built model's parameters are the IR's parameter table, names and shapes (a tied lm_head aside), and their
    count is the cost model's total."""
    actual = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    if ir.spec.model.tie_embeddings:
        actual.pop("lm_head.weight")
    assert actual == parameter_table(ir)
    assert sum(p.numel() for p in model.parameters()) == cost_report(ir).total_params


def decode_in_steps(model, tokens: torch.Tensor, prefill: int, *, max_len: int | None = None,
                    length_as_tensor: bool = False, **kwargs) -> torch.Tensor:
    """The logits (B, T, V) of `tokens` through a fresh cache of max_len positions (default T): one forward over the
    first `prefill` tokens, then one token at a time, concatenated; `length_as_tensor` holds the cache's position as a
    tensor after the prefill, as generate's CUDA graph passes it; kwargs go to every forward. Compare it with one
    forward over all of `tokens`."""
    with torch.no_grad():
        cache = model.empty_cache(tokens.size(0), max_len or tokens.size(1))
        steps = [model(tokens[:, :prefill], cache=cache, **kwargs).logits]
        if length_as_tensor:
            cache.length = torch.tensor(cache.length)
        steps += [model(tokens[:, t : t + 1], cache=cache, **kwargs).logits for t in range(prefill, tokens.size(1))]
    return torch.cat(steps, dim=1)


@pytest.fixture
def one_thread():
    """Run the test on one thread: a tiny model's ops are too small to gain from more, and on shared CPUs the threads
    wait on each other (the forecaster's CO2 test took 36 s on one thread and 195 s on two, on a busy 2-core machine).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def build(tmp_path):
    """build(spec_path, preset="tiny", overrides=()) -> the generated package, imported."""

    def _build(spec_path, preset="tiny", overrides=()):
        return build_package(spec_path, tmp_path, preset, tuple(overrides))

    return _build
