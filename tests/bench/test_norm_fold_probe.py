"""bench/norm_fold_probe.py: its two modes, the package's folding decoding_steps as generated and wrapped to norm x
first and hand their branches no norm."""

import pytest
import torch

from bench.harness import ROOT, load_module


@pytest.fixture(scope="module")
def probe():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling `decode` as a script does
        yield load_module("bench_norm_fold_probe", "bench/norm_fold_probe.py")


def test_normed_first_norms_x_and_hands_the_branches_no_norm_and_folded_restores(probe, tmp_path):
    from archgen.testing import build_generated

    package = build_generated(ROOT / "specs/hymba_plus.yaml", tmp_path, "tiny", ())[0]
    seen = []
    for name in ("AttnSsmParallel", "GlobalAttnSsmParallel"):
        def recorder(self, x, positions, cache, pads, step, residual, norm, input_norm, name=name):
            seen.append((name, x, input_norm))
        getattr(package.model, name).decoding_step = recorder
    recorders = {cls: cls.decoding_step for cls in (package.model.AttnSsmParallel, package.model.GlobalAttnSsmParallel)}
    modes, switch, recorded = probe.probe_modes(package)
    assert modes[:2] == ["folded", "normed_first"] and all(m.startswith("folded+in_proj_") for m in modes[2:])
    assert sorted(recorded["folding_classes"]) == ["AttnSsmParallel", "GlobalAttnSsmParallel"]
    norm = torch.nn.RMSNorm(8, eps=1e-6)
    x = torch.randn(1, 1, 8)
    switch("normed_first")
    for cls in recorders:
        cls.decoding_step(None, x, None, None, None, None, None, None, norm)
    assert [(name, input_norm) for name, _, input_norm in seen] == [(cls.__name__, None) for cls in recorders]
    assert all(torch.equal(normed, norm(x)) for _, normed, _ in seen)
    gemv = package.kernels.gemv_module
    for mode in modes[2:]:
        switch(mode)
        assert all(cls.decoding_step is step for cls, step in recorders.items())
        assert recorded["in_proj_key"] in gemv.FORWARD_TUNER.chosen
    switch("folded")
    assert all(cls.decoding_step is step for cls, step in recorders.items())
    assert recorded["in_proj_key"] not in gemv.FORWARD_TUNER.chosen


def test_a_package_without_folding_layers_is_refused(probe, tmp_path):
    from archgen.testing import build_generated

    package = build_generated(ROOT / "specs/hspmn.yaml", tmp_path, None, ())[0]
    with pytest.raises(ValueError, match="no parallel layer folds its input norm"):
        probe.probe_modes(package)
