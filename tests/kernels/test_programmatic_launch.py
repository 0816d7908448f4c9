"""Programmatic dependent launch (triton_support.programmatic_launch): the switch, what the launchers pass, and the
kernels' PDL paths run in Triton's interpreter with the grid dependency control emulated.

The interpreter runs no PTX, so there the switch is off and the kernels' gdc calls are compiled out; these tests turn
the kernel files' `programmatic_launch` on and replace their `gdc_wait` / `gdc_launch_dependents` with Python
stand-ins: the wait stand-in is where "the kernel ahead" finishes, so the inputs an earlier kernel writes hold NaN
until the first program waits. A program that read them before its wait would compute NaN; one that skipped the wait
would be counted. The outputs must equal those of the PDL-off launch bit for bit (PDL changes no arithmetic)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import causal_conv1d, gemv, normalized_mean, rmsnorm, state_update, triton_support

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="emulates the grid dependency control in the interpreter")


# ---------------------------------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------------------------------


def test_the_switch_is_off_on_the_cpu_and_under_the_interpreter():
    assert triton_support.interpreting()
    assert not triton_support.programmatic_launch(torch.device("cpu"))
    assert not triton_support.programmatic_launch(torch.device("cuda", 0))  # interpreting: no PTX to run


@pytest.fixture
def outside_the_interpreter(monkeypatch):
    """programmatic_launch as on a machine with CUDA device 0 of compute capability 9 and device 1 of 8 (cached, so
    nothing asks the driver), the setter's choice restored afterwards."""
    monkeypatch.setattr(triton_support, "interpreting", lambda: False)
    monkeypatch.setattr(triton_support, "_SM90_DEVICES", {0: True, 1: False})
    monkeypatch.setattr(triton_support, "_PDL_ALLOWED", triton_support._PDL_ALLOWED)


@pytest.mark.usefixtures("outside_the_interpreter")
def test_the_switch_takes_hopper_and_honours_the_environment_and_the_setter(monkeypatch):
    hopper, ampere = torch.device("cuda", 0), torch.device("cuda", 1)
    monkeypatch.delenv("ARCHGEN_PDL", raising=False)
    triton_support.set_programmatic_launch(None)  # the environment's: off by default (it measured slower)
    assert not triton_support.programmatic_launch(hopper)
    monkeypatch.setenv("ARCHGEN_PDL", "1")
    triton_support.set_programmatic_launch(None)
    assert triton_support.programmatic_launch(hopper) and not triton_support.programmatic_launch(ampere)
    assert not triton_support.programmatic_launch(torch.device("cpu"))
    triton_support.set_programmatic_launch(False)  # the setter overrides the environment, for a same-process A/B
    assert not triton_support.programmatic_launch(hopper)
    monkeypatch.setenv("ARCHGEN_PDL", "0")
    triton_support.set_programmatic_launch(True)
    assert triton_support.programmatic_launch(hopper) and not triton_support.programmatic_launch(ampere)
    triton_support.set_programmatic_launch(None)
    assert not triton_support.programmatic_launch(hopper)


# ---------------------------------------------------------------------------------------------------------------
# What the launchers pass
# ---------------------------------------------------------------------------------------------------------------


class RecordingKernel:
    """Stands in for a @triton.jit kernel: kernel[grid](...) records the grid and keyword arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


def _gemv(x):
    return gemv.gemv_forward(x, torch.randn(6, 8), config=gemv.INTERPRETER_CONFIG)


def _qkv(x):
    return gemv.qkv_gemv_forward(x, torch.randn(4, 8), torch.randn(2, 8), torch.randn(2, 8),
                                 config=gemv.INTERPRETER_CONFIG)


def _rms(x):
    return rmsnorm.rms_norm_forward(x, None, torch.ones(8), 1e-6, config={"BLOCK_R": 1, "num_warps": 4})


def _mean(x):
    return normalized_mean.normalized_mean_forward(x, x, *(torch.ones(8) for _ in range(4)), 1e-6)


def _conv(x):
    config = {"BLOCK_T": 8, "BLOCK_D": 16, "num_warps": 1, "WINDOW": True}
    return causal_conv1d.causal_conv1d_forward(x[:, None], torch.randn(8, 4), None, torch.randn(2, 8, 3), True,
                                               config=config)


def _mamba(x):
    return state_update._launch_mamba_step(torch.randn(2, 8, 4), x, x, torch.randn(8, 4), torch.randn(2, 4),
                                           torch.randn(2, 4), None, None, None)


def _mamba2(x):  # H = 2 heads of P = 4, one group, N = 2: xbc 8 + 2·2 channels, width 4
    return state_update._launch_mamba2_step(x, torch.randn(2, 12), torch.randn(2, 2), torch.randn(2, 12, 3),
                                            torch.randn(12, 4), None, torch.randn(2, 2, 4, 2), torch.randn(2), None,
                                            None, 0.0, math.inf, 1)


# module, kernel, launcher, whether it is launched programmatically (a consumer) or only lets its dependents start
LAUNCHERS = {"gemv": (gemv, "_gemv_kernel", _gemv, True), "qkv_gemv": (gemv, "_qkv_gemv_kernel", _qkv, True),
             "rmsnorm": (rmsnorm, "_rms_norm_fwd_kernel", _rms, True),
             "normalized_mean": (normalized_mean, "_normalized_mean_kernel", _mean, True),
             "conv_window": (causal_conv1d, "_conv_fwd_window_kernel", _conv, False),
             "mamba_step": (state_update, "_selective_step_kernel", _mamba, False),
             "mamba2_step": (state_update, "_mamba2_step_kernel", _mamba2, False)}


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launches_pass_the_switch(monkeypatch, name, on):
    module, kernel_name, launcher, consumer = LAUNCHERS[name]
    recording = RecordingKernel()
    monkeypatch.setattr(module, kernel_name, recording)
    asked = []
    monkeypatch.setattr(module, "programmatic_launch", lambda device: asked.append(device) or on)
    launcher(torch.randn(2, 8))
    assert asked and all(device.type == "cpu" for device in asked)
    ((_grid, kwargs),) = recording.launches
    assert kwargs["PDL"] is on
    if consumer:
        assert kwargs["launch_pdl"] is on
    else:  # its trigger lets a programmatically launched dependent start; it waits on nothing itself
        assert "launch_pdl" not in kwargs


def test_rms_norm_launches_of_many_rows_stay_off(monkeypatch):
    """Prefill and training rows: no programmatic launch whatever the switch says."""
    recording = RecordingKernel()
    monkeypatch.setattr(rmsnorm, "_rms_norm_fwd_kernel", recording)
    monkeypatch.setattr(rmsnorm, "programmatic_launch", lambda device: True)
    for rows in (rmsnorm.PDL_MAX_ROWS, rmsnorm.PDL_MAX_ROWS + 1):
        rmsnorm.rms_norm_forward(torch.randn(rows, 8), None, torch.ones(8), 1e-6, config={"BLOCK_R": 1, "num_warps": 4})
    assert [kwargs["launch_pdl"] for _grid, kwargs in recording.launches] == [True, False]


# ---------------------------------------------------------------------------------------------------------------
# The PDL paths in the interpreter
# ---------------------------------------------------------------------------------------------------------------


class GridDependencies:
    """gdc_wait / gdc_launch_dependents for the interpreter: `earlier` tensors (what the kernel ahead writes) hold NaN
    until the first wait, which writes their values; every call is counted."""

    def __init__(self, monkeypatch, module, earlier: dict | None = None):
        self.waits = self.triggers = 0
        self.earlier = [(t, t.clone()) for t in (earlier or {}).values()]
        for t, _ in self.earlier:
            t.fill_(math.nan)
        monkeypatch.setattr(module, "programmatic_launch", lambda device: True)
        if hasattr(module, "gdc_wait"):  # the producers only trigger
            monkeypatch.setattr(module, "gdc_wait", self.wait)
        monkeypatch.setattr(module, "gdc_launch_dependents", self.trigger)

    def wait(self):
        if self.waits == 0:
            for t, value in self.earlier:
                t.copy_(value)
        self.waits += 1

    def trigger(self):
        self.triggers += 1


def _reference_run(monkeypatch, module, run):
    with monkeypatch.context() as off:
        off.setattr(module, "programmatic_launch", lambda device: False)
        return run()


# (M rows, N, K, gated): K above, at and below the interpreter's BLOCK_K of 32 and not a multiple of it; N not a
# multiple of BLOCK_N = 4, so the last programs are partly masked
GEMV_CASES = {"M1-N6-K70": (1, 6, 70, False), "M3-N5-K32-gated": (3, 5, 32, True), "M2-N9-K20": (2, 9, 20, False),
              "M1-N7-K100-gated": (1, 7, 100, True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GEMV_CASES)
def test_gemv_waits_in_every_program_before_reading_x(monkeypatch, case, dtype):
    M, N, K, gated = GEMV_CASES[case]
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w, w_up = (torch.randn(N, K, generator=g).to(dtype) for _ in range(2))
    b, b_up = (torch.randn(N, generator=g).to(dtype) for _ in range(2))

    def run():
        return gemv.gemv_forward(x, w, b, w_up if gated else None, b_up if gated else None,
                                 config=gemv.INTERPRETER_CONFIG)

    expected = _reference_run(monkeypatch, gemv, run)
    dependencies = GridDependencies(monkeypatch, gemv, {"x": x})
    y = run()
    programs = M * math.ceil(N / gemv.INTERPRETER_CONFIG["BLOCK_N"])
    assert dependencies.waits == programs and dependencies.triggers == programs
    assert torch.equal(y, expected)


@pytest.mark.parametrize("K", [20, 70])
def test_qkv_gemv_waits_in_every_program_before_reading_x(monkeypatch, K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(2, K, generator=g).to(torch.bfloat16)
    q, k, v = (torch.randn(n, K, generator=g).to(torch.bfloat16) for n in (10, 3, 3))
    biases = [torch.randn(n, generator=g).to(torch.bfloat16) for n in (10, 3, 3)]

    def run():
        return gemv.qkv_gemv_forward(x, q, k, v, *biases, config=gemv.INTERPRETER_CONFIG)

    expected = _reference_run(monkeypatch, gemv, run)
    dependencies = GridDependencies(monkeypatch, gemv, {"x": x})
    y = run()
    assert dependencies.waits == dependencies.triggers == 2 * (3 + 1 + 1)  # 10 q rows: 3 blocks of 4, k and v: 1 each
    assert torch.equal(y, expected)


@pytest.mark.parametrize(("rows", "tile_rows", "fused"), [(3, 1, False), (5, 2, True), (1, 1, True)])
def test_rms_norm_waits_in_every_program_before_reading_its_rows(monkeypatch, rows, tile_rows, fused):
    g = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, 40, generator=g).to(torch.bfloat16), torch.randn(rows, 40, generator=g)
    weight = torch.randn(40, generator=g)

    def run():
        return rmsnorm.rms_norm_forward(x, residual.to(x.dtype) if fused else None, weight, 1e-6,
                                        config={"BLOCK_R": tile_rows, "num_warps": 4})

    expected = _reference_run(monkeypatch, rmsnorm, run)
    residual = residual.to(x.dtype)  # the one the kernel reads, poisoned until the wait
    dependencies = GridDependencies(monkeypatch, rmsnorm, {"x": x, "residual": residual})
    got = run()
    assert dependencies.waits == dependencies.triggers == math.ceil(rows / tile_rows)
    for value, wanted in zip(got, expected, strict=True):
        assert torch.equal(value, wanted)


def test_normalized_mean_waits_in_every_program_before_reading_the_branches(monkeypatch):
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(5, 2 * 600, generator=g).to(torch.bfloat16)
    a, b = packed[:, :600], packed[:, 600:]  # rows 1200 apart; 600 wide: BLOCK_N 1024, 4 rows a program
    vectors = [torch.randn(600, generator=g) for _ in range(4)]

    def run():
        return normalized_mean.normalized_mean_forward(a, b, *vectors, 1e-6)

    expected = _reference_run(monkeypatch, normalized_mean, run)
    dependencies = GridDependencies(monkeypatch, normalized_mean, {"packed": packed})
    y = run()
    assert dependencies.waits == dependencies.triggers == 2  # 5 rows, 4 a program
    assert torch.equal(y, expected)


def test_the_producers_let_their_dependents_start_in_every_program(monkeypatch):
    """The conv's window kernel and the Mamba steps only trigger: once per program, nothing waited for, the same
    results."""
    g = torch.Generator().manual_seed(1)
    x, state = torch.randn(2, 1, 21, generator=g), torch.randn(2, 21, 3, generator=g)
    weight = torch.randn(21, 4, generator=g)
    config = {"BLOCK_T": 8, "BLOCK_D": 16, "num_warps": 1, "WINDOW": True}

    def conv():
        return causal_conv1d.causal_conv1d_forward(x, weight, None, state, True, config=config)

    expected = _reference_run(monkeypatch, causal_conv1d, conv)
    dependencies = GridDependencies(monkeypatch, causal_conv1d)
    for value, wanted in zip(conv(), expected, strict=True):
        assert torch.equal(value, wanted)
    assert dependencies.triggers == 2 * 2 and dependencies.waits == 0  # batch 2 × two blocks of 16 channels

    step_state, u, delta = torch.randn(2, 37, 5, generator=g), torch.randn(2, 37, generator=g), torch.randn(2, 37, generator=g)
    A_log, B, C = torch.randn(37, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)

    def step():
        return state_update._launch_mamba_step(step_state, u, delta, A_log, B, C, None, None, None)

    expected = _reference_run(monkeypatch, state_update, step)
    dependencies = GridDependencies(monkeypatch, state_update)
    for value, wanted in zip(step(), expected, strict=True):
        assert torch.equal(value, wanted)
    blocks = math.ceil(37 / state_update.SELECTIVE_STEP_CONFIG["BLOCK_D"])
    assert dependencies.triggers == 2 * blocks and dependencies.waits == 0
