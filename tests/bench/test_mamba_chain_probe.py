"""bench/mamba_chain_probe.py's rewrite of a generated model.py: each parallel decoding_step records its second branch
first, and nothing else changes."""

import re

import pytest

from bench.harness import ROOT, load_module


@pytest.fixture(scope="module")
def probe():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling `decode` as a script does
        yield load_module("bench_mamba_chain_probe", "bench/mamba_chain_probe.py")


def test_each_decoding_step_records_the_ssm_branch_first_and_nothing_else_moves(probe):
    source = (ROOT / "generated/hymba_plus/model.py").read_text()
    swapped = probe.branches_swapped(source)
    compile(swapped, "model_ssm_first.py", "exec")
    step = re.compile(r"^    def decoding_step\(.*?(?=^    def |^class |\Z)", re.M | re.S)
    branches = re.compile(r"with branch_stream\(x, (\d)\)")
    # the global and the windowed layers' decoding_steps: the ssm branch (1) first, then the attention (0)
    assert [branches.findall(body) for body in step.findall(swapped)] == [["1", "0"], ["1", "0"]]
    assert [branches.findall(body) for body in step.findall(source)] == [["0", "1"], ["0", "1"]]
    assert sorted(swapped.splitlines()) == sorted(source.splitlines())
    assert step.sub("", swapped) == step.sub("", source)  # forward and the rest as generated


def test_a_model_without_parallel_layers_is_refused(probe):
    with pytest.raises(ValueError, match="no decoding_step"):
        probe.branches_swapped((ROOT / "generated/hspmn/model.py").read_text())


def test_each_mode_swaps_the_order_and_pins_only_its_own_config(probe, tmp_path):
    from archgen.testing import build_generated

    package = build_generated(ROOT / "specs/hymba_plus.yaml", tmp_path, "tiny", ())[0]
    modes, switch, recorded = probe.probe_modes(package)
    gemv, state_update = package.kernels.gemv_module, package.kernels.state_update_module
    step, as_built = package.model.AttnSsmParallel.decoding_step, dict(state_update.SELECTIVE_STEP_CONFIG)
    launch_config = package.kernels.combine_projections_module.launch_config
    for mode in modes:
        switch(mode)
        swapped = package.model.AttnSsmParallel.decoding_step is not step
        assert swapped == mode.startswith("ssm_first"), mode
        pinned = {key for key in recorded["gemv_keys"].values() if key in gemv.FORWARD_TUNER.chosen}
        assert len(pinned) == ("+x_proj_" in mode or "+in_proj_" in mode), mode
        assert (state_update.SELECTIVE_STEP_CONFIG != as_built) == ("+step_" in mode), mode
        out_proj = package.kernels.combine_projections_module.launch_config(1600, 3200)
        assert (out_proj != launch_config(1600, 3200)) == ("+out_proj_" in mode), mode
        assert package.kernels.combine_projections_module.launch_config(1600, 1600) == launch_config(1600, 1600)
    switch(modes[0])
    assert package.model.AttnSsmParallel.decoding_step is step and state_update.SELECTIVE_STEP_CONFIG == as_built
    assert package.kernels.combine_projections_module.launch_config is launch_config
