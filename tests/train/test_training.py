"""archgen train end to end on tiny models: every seed spec's objectives, exact resume, checkpoints that the
generated package loads, generation from a checkpoint, schedules and precision."""

from __future__ import annotations

import functools
import itertools
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from archgen.cli import main
from archgen.train.generate import generate_text
from archgen.train.loop import learning_rate, train
from archgen.train.metrics import read_metrics
from archgen.train.package import import_package
from archgen.train.recipe import CosineSchedule, WSDSchedule
from tests.conftest import SPECS
from tests.train.recipes import recipe_dict, write_corpus, write_recipe

# What each seed's tiny preset must show in its metrics: the objectives the recipe trains besides next-token.
EXPECTED_AUX = {
    "hns_ss_jepa_moe": {"jepa_l2", "medusa", "moe_load_balancing", "moe_z_loss"},
    "hspmn": {"router_entropy", "router_fraction"},
    "hymba_plus": set(),
    "nexus": {"jepa_vicreg_variance", "jepa_vicreg_covariance", "jepa_vicreg_invariance"},
}


@pytest.mark.parametrize("spec", [p.stem for p in SPECS])
def test_every_seed_spec_trains_with_its_objectives_and_its_loss_falls(tmp_path, spec):
    corpus = write_corpus(tmp_path / "data")
    jepa = spec in ("hns_ss_jepa_moe", "nexus")
    recipe = recipe_dict(corpus, spec, steps=6, batch__tokens=32, eval__interval=6,
                         **({"objectives__jepa": {"momentum": {"start": 0.9, "end": 1.0}}} if jepa else {}))
    result = train(write_recipe(tmp_path / "r.yaml", recipe), show_progress=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    # Every auxiliary loss the package returns in training is trained and logged (read off the package itself, so a
    # spec added later is held to it too), and the seeds' known objectives are among them.
    model = import_package(result.output_dir / "package" / recipe_path_name(result)).Model()
    tokens = torch.randint(0, 256, (1, 17))
    produced = set(model(tokens[:, :-1], targets=tokens[:, 1:]).aux_losses)
    expected = produced | EXPECTED_AUX.get(spec, set())
    assert expected <= set(rows[0]), f"objectives missing from the metrics: {expected - set(rows[0])}"
    if jepa:  # the EMA target follows the recipe's momentum schedule, rising to its end value at the last step
        momenta = [r["ema_momentum"] for r in rows]
        assert momenta == sorted(momenta) and 0.9 < momenta[0] and momenta[-1] == pytest.approx(1.0)
    first, last = rows[0]["next_token_loss"], rows[-1]["next_token_loss"]
    assert last < first - 0.5, f"next-token loss went {first:.3f} -> {last:.3f}"
    assert math.isfinite(result.eval_loss)


def test_titans_memory_is_written_during_training(tmp_path, monkeypatch):
    """The recipe's titans_writes reaches the model as update_memory=True (and False turns it off)."""
    from archgen.train.adapter import ModelAdapter

    calls = []
    original = ModelAdapter.forward

    def spy(self, module, tokens):
        calls.append(self.writes_memory)
        return original(self, module, tokens)

    monkeypatch.setattr(ModelAdapter, "forward", spy)
    corpus = write_corpus(tmp_path / "data")
    for writes in (True, False):
        calls.clear()
        recipe = recipe_dict(corpus, "nexus", steps=1, batch__tokens=32, objectives__titans_writes=writes,
                             output=str(tmp_path / f"run-{writes}"))
        train(write_recipe(tmp_path / "r.yaml", recipe), show_progress=False)
        assert calls and set(calls) == {writes}


def recipe_path_name(result):
    """The package directory's name under <run>/package/ (the spec's name)."""
    (package,) = (result.output_dir / "package").iterdir()
    return package.name


def tensors(checkpoint, name):
    return load_file(str(checkpoint / name))


def test_resume_continues_bit_for_bit(tmp_path):
    """4 steps straight == 2 steps, stop, resume for 2 more: weights, optimizer state and every logged loss.
    HSPMN's router draws noise while training, so this also checks that the RNG state travels."""
    corpus = write_corpus(tmp_path / "data")
    straight = train(write_recipe(tmp_path / "a.yaml", recipe_dict(corpus, output=str(tmp_path / "a"))), show_progress=False)
    recipe_b = write_recipe(tmp_path / "b.yaml", recipe_dict(corpus, output=str(tmp_path / "b")))
    stopped = train(recipe_b, stop_after=2, show_progress=False)
    assert stopped.step == 2 and stopped.checkpoint.name == "step-00000002"
    resumed = train(recipe_b, resume=True, show_progress=False)
    assert resumed.step == 4
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = tensors(straight.checkpoint, name), tensors(resumed.checkpoint, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"
    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(run.output_dir / "metrics.jsonl") if "loss" in r]

    assert losses(straight) == losses(resumed)
    assert straight.eval_loss == resumed.eval_loss


def test_checkpoint_loads_with_from_pretrained_and_generates(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    result = train(write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, steps=2)), show_progress=False)
    checkpoint = result.checkpoint
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["data"]["files"][0]["sha256"] and manifest["data"]["tokens"]["train"] > 0
    assert (checkpoint / "recipe.yaml").read_text() == (tmp_path / "r.yaml").read_text()
    assert "spec_hash" in (checkpoint / "spec.lock.yaml").read_text() or (checkpoint / "spec.lock.yaml").stat().st_size > 0
    package = import_package(checkpoint / "package")
    model = package.Model.from_pretrained(checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert torch.equal(model.embed.weight, weights["embed.weight"])

    out = CliRunner().invoke(main, ["generate", str(result.output_dir), "--prompt", "The quick", "--max-new-tokens", "12",
                                    "--temperature", "0"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("The quick") and len(out.output) > len("The quick")
    again = CliRunner().invoke(main, ["generate", str(checkpoint), "--prompt", "The quick", "--max-new-tokens", "12",
                                      "--temperature", "0"])
    assert again.output == out.output, "greedy decoding is deterministic"
    pieces = []
    continuation = generate_text(checkpoint, "The quick", max_new_tokens=12, temperature=0, write=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == continuation, "the text streams out as it is decoded"
    assert out.output == "The quick" + continuation + "\n"


def test_compile_compiles_each_layer_once_per_class_and_trains_as_eager(tmp_path, monkeypatch):
    """`compile: true` compiles every layer of Model.layers (not the whole model): Hymba+'s global- and
    windowed-attention layers are two classes, so two graphs for its four layers, none again for evaluation, which runs
    eagerly; the losses are eager's, with and without gradient checkpointing (which runs each compiled layer again in
    the backward). aot_eager stands in for inductor (the same graphs, no code generation: inductor on a CPU takes
    minutes; tests/generated/test_compile.py runs inductor)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    corpus = write_corpus(tmp_path / "data")

    def run(compile_: bool, checkpointing: bool = False):
        name = f"compile-{compile_}-checkpointing-{checkpointing}"
        recipe = recipe_dict(corpus, "hymba_plus", steps=3, compile=compile_, gradient_checkpointing=checkpointing,
                             eval__interval=2, output=str(tmp_path / name))
        result = train(write_recipe(tmp_path / f"{name}.yaml", recipe), show_progress=False)
        return result, [r["loss"] for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]

    eager, eager_losses = run(False)
    for checkpointing in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled, compiled_losses = run(True, checkpointing)
        model = import_package(compiled.output_dir / "package" / "hymba_plus").Model()
        assert counters["stats"]["unique_graphs"] == len({type(layer) for layer in model.layers}) == 2, checkpointing
        assert compiled_losses == pytest.approx(eager_losses, rel=1e-5), checkpointing
        assert compiled.eval_loss == pytest.approx(eager.eval_loss, rel=1e-5), checkpointing


def test_bf16_weights_with_float32_master_train(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    result = train(write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, steps=3, precision="bf16")), show_progress=False)
    weights = load_file(str(result.checkpoint / "model.safetensors"))
    master = load_file(str(result.checkpoint / "master.safetensors"))
    assert weights["embed.weight"].dtype == torch.bfloat16 and master["embed.weight"].dtype == torch.float32
    assert torch.equal(master["embed.weight"].to(torch.bfloat16), weights["embed.weight"])
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_schedules():
    cosine = CosineSchedule(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    rates = [learning_rate(cosine, 1.0, s, 110) for s in range(110)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(rates[9:]))
    wsd = WSDSchedule(kind="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    rates = [learning_rate(wsd, 1.0, s, 100) for s in range(100)]
    assert rates[:80] == [1.0] * 80 and rates[-1] == pytest.approx(0.0) and rates[90] == pytest.approx(0.45)
