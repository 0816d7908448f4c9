"""bench/mamba_chain_probe.py: its rewrite of a generated model.py (each parallel decoding_step records its two branches
in the other order, and nothing else changes) and its modes (each switches the order and at most one config)."""

import re

import pytest

from bench.harness import ROOT, load_module


@pytest.fixture(scope="module")
def probe():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling `decode` as a script does
        yield load_module("bench_mamba_chain_probe", "bench/mamba_chain_probe.py")


def test_each_decoding_step_records_its_branches_in_the_other_order_and_nothing_else_moves(probe):
    source = (ROOT / "generated/hymba_plus/model.py").read_text()
    swapped = probe.branches_swapped(source)
    compile(swapped, "model_swapped.py", "exec")
    step = re.compile(r"^    def decoding_step\(.*?(?=^    def |^class |\Z)", re.M | re.S)
    branches = re.compile(r"with branch_stream\(x, (\d)\)")
    # the global and the windowed layers' decoding_steps, each with its two branches in the other order
    as_built = [branches.findall(body) for body in step.findall(source)]
    assert len(as_built) == 2 and all(sorted(order) == ["0", "1"] for order in as_built)
    assert [branches.findall(body) for body in step.findall(swapped)] == [order[::-1] for order in as_built]
    assert {probe.recorded_first(source), probe.recorded_first(swapped)} == {"attn", "ssm"}
    assert sorted(swapped.splitlines()) == sorted(source.splitlines())
    assert step.sub("", swapped) == step.sub("", source)  # forward and the rest as generated


def test_a_model_without_parallel_layers_is_refused(probe):
    with pytest.raises(ValueError, match="no decoding_step"):
        probe.branches_swapped((ROOT / "generated/hspmn/model.py").read_text())


def test_each_mode_swaps_the_order_and_pins_only_its_own_config(probe, tmp_path):
    from archgen.testing import build_generated

    package = build_generated(ROOT / "specs/hymba_plus.yaml", tmp_path, "tiny", ())[0]
    modes, switch, recorded = probe.probe_modes(package)
    assert sorted(modes[:2]) == ["attn_first", "ssm_first"]  # as generated, then swapped
    gemv, state_update = package.kernels.gemv_module, package.kernels.state_update_module
    step, as_built = package.model.AttnSsmParallel.decoding_step, dict(state_update.SELECTIVE_STEP_CONFIG)
    launch_config = package.kernels.combine_projections_module.launch_config
    for mode in modes:
        switch(mode)
        swapped = package.model.AttnSsmParallel.decoding_step is not step
        assert swapped == (mode.partition("+")[0] == modes[1]), mode
        pinned = {key for key in recorded["gemv_keys"].values() if key in gemv.FORWARD_TUNER.chosen}
        assert len(pinned) == ("+x_proj_" in mode or "+in_proj_" in mode), mode
        assert (state_update.SELECTIVE_STEP_CONFIG != as_built) == ("+step_" in mode), mode
        out_proj = package.kernels.combine_projections_module.launch_config(1600, 3200)
        assert (out_proj != launch_config(1600, 3200)) == ("+out_proj_" in mode), mode
        assert package.kernels.combine_projections_module.launch_config(1600, 1600) == launch_config(1600, 1600)
    switch(modes[0])
    assert package.model.AttnSsmParallel.decoding_step is step and state_update.SELECTIVE_STEP_CONFIG == as_built
    assert package.kernels.combine_projections_module.launch_config is launch_config


def test_the_tail_mode_swaps_ssm_forward_and_falls_back_to_it_off_the_gpu(probe, tmp_path):
    import torch

    from archgen.testing import build_generated

    package = build_generated(ROOT / "specs/hymba_plus.yaml", tmp_path, "tiny", ())[0]
    generated = package.model.Ssm.forward
    modes, switch, _ = probe.probe_modes(package, tail=True)
    assert sorted(modes[:2]) == ["attn_first", "ssm_first"] and modes[2:] == ["ssm_first+x_proj_tail"]
    torch.manual_seed(0)
    model = package.Model().eval()
    prompt = torch.randint(0, 256, (1, 5))
    tokens = {}
    for mode in modes:
        switch(mode)
        assert (package.model.Ssm.forward is not generated) == mode.endswith("x_proj_tail"), mode
        with torch.no_grad():  # on the CPU the tail's forward hands every call to the generated one
            tokens[mode] = model.generate(prompt, max_new_tokens=3, temperature=0)
    switch(modes[0])
    assert package.model.Ssm.forward is generated
    assert all(torch.equal(t, tokens[modes[0]]) for t in tokens.values())
