"""bench/train_gpu.py's GPU runs pass `archgen train`'s checks before compute (spec, data, vocabulary) for every model
it offers, whole and cut to the 4 layers of resume_1_to_1: a run that would fail at once on the GPU fails here."""

from __future__ import annotations

import dataclasses

import pytest

from archgen.train.checks import plan_training
from archgen.train.recipe import load_recipe
from bench.harness import ROOT, load_module


@pytest.fixture(scope="module")
def train_gpu():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling `harness` as a script does
        yield load_module("train_gpu", "bench/train_gpu.py")


@pytest.mark.parametrize("model", ["bamba_1b", "hymba_plus"])
@pytest.mark.parametrize("layers", ["all", "four"])
def test_every_model_the_bench_trains_passes_the_checks_before_compute(tmp_path, train_gpu, model, layers):
    setup = train_gpu.MODELS[model]
    if layers == "four":
        setup = dataclasses.replace(setup, overrides=setup.overrides + setup.resume_layers)
    data, _ = train_gpu.write_data(tmp_path, 200_000)
    recipe = train_gpu.write_recipe(tmp_path, "run", setup, data, steps=4, micro=setup.micro_batch, compile_=True)
    plan = plan_training(load_recipe(recipe))
    assert plan.tokenizer.vocab_size == plan.compiled.resolved.model.vocab_size == 256
    assert len(plan.compiled.resolved.layers) == (4 if layers == "four" else {"bamba_1b": 16, "hymba_plus": 32}[model])
