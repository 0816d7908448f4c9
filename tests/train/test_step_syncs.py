"""The loop's step does not wait for the device between records, and `cuda_graph: true` (train/graphed.py): off CUDA
the same eager steps, the same numbers; on one GPU the recorded step trains as the eager one (CUDA-only tests,
skipped here); refused, located, where a recorded step cannot work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from archgen.errors import CompileError
from archgen.train import loop
from archgen.train.checks import plan_training
from archgen.train.graphed import GraphedStep
from archgen.train.loop import train
from archgen.train.metrics import MetricsLog, read_metrics
from archgen.train.recipe import load_recipe
from tests.train.recipes import recipe_dict, write_corpus, write_recipe
from tests.train.test_recipe_errors import assert_located_failure, line_of, run_train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

# What hands a tensor's value to Python: each waits for the device to finish the work that produces it. (A sync
# inside a C++ op, such as nonzero's, is invisible from Python; on a GPU, bench/train_gpu.py's step times show those.)
SYNCS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def losses(run_dir):
    return [{k: v for k, v in row.items() if "loss" in k or k in ("step", "lr", "grad_norm", "ema_momentum")}
            for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]


def assert_same_state(a, b):
    for name in ("model.safetensors", "optimizer.safetensors"):
        first, second = load_file(str(a / name)), load_file(str(b / name))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key} differs"


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_no_host_sync_between_records(tmp_path, monkeypatch, cuda_graph):
    """Between one training record and the next (two steps of two micro-batches each), nothing in the loop reads a
    tensor's value: the losses and the gradient norm stay tensors until the record is written. Tiny Hymba+, clipped,
    fused AdamW (the foreach one reads its step counters with .item() on a CPU); not HSPMN, whose routed attention
    reads its routing decisions (pack_selected: the model's own syncs, not the loop's)."""
    events = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            events.append(("sync", _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    write = MetricsLog.write
    monkeypatch.setattr(MetricsLog, "write", lambda self, record: (events.append(("write", record)), write(self, record)))
    step_means = loop._step_means
    monkeypatch.setattr(loop, "_step_means", lambda *a: (events.append(("means", None)), step_means(*a))[1])

    corpus = write_corpus(tmp_path / "data")
    recipe = recipe_dict(corpus, "hymba_plus", steps=6, log_interval=2, optimizer__fused=True, cuda_graph=cuda_graph)
    train(write_recipe(tmp_path / "r.yaml", recipe), show_progress=False)

    windows, current = [], None
    for kind, what in events:
        if kind == "write" and "loss" in what:
            current = []
        elif kind == "means" and current is not None:
            windows.append(current)
            current = None
        elif kind == "sync" and current is not None:
            current.append(what)
    assert len(windows) == 2, "records at steps 2, 4 and 6: two windows of two steps between them"
    assert windows == [[], []], f"the steps between records read tensors' values: {windows}"


def test_cuda_graph_off_cuda_trains_as_without_it(tmp_path):
    """On a CPU the option changes nothing: the same logged losses and gradient norms, weights and optimizer state,
    bit for bit, also across a stop and resume (2 + 2 steps with it against 4 without)."""
    corpus = write_corpus(tmp_path / "data")
    without = train(write_recipe(tmp_path / "a.yaml", recipe_dict(corpus, output=str(tmp_path / "a"))),
                    show_progress=False)
    recipe = write_recipe(tmp_path / "b.yaml", recipe_dict(corpus, cuda_graph=True, output=str(tmp_path / "b")))
    train(recipe, stop_after=2, show_progress=False)
    with_it = train(recipe, resume=True, show_progress=False)
    assert with_it.step == without.step == 4
    assert losses(with_it.output_dir) == losses(without.output_dir)
    assert with_it.eval_loss == without.eval_loss
    assert_same_state(with_it.checkpoint, without.checkpoint)


def test_cuda_graph_under_torchrun_is_a_located_error(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, cuda_graph=True, batch__tokens=128))
    with pytest.raises(CompileError) as caught:
        plan_training(load_recipe(path), world_size=2)
    (problem,) = caught.value.diagnostics
    assert problem.path == "cuda_graph" and "2 processes" in problem.message and "without torchrun" in problem.fix
    assert problem.location.line == line_of(path.read_text(), "cuda_graph")


def test_cuda_graph_with_compile_is_a_located_error(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, cuda_graph=True, compile=True))
    assert_located_failure(run_train(path), path, "cuda_graph", "cuda_graph", "together with compile: true", tmp_path)


def test_cuda_graph_with_a_jepa_momentum_schedule_is_a_located_error(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, "nexus", cuda_graph=True,
                                                         objectives__jepa={"momentum": {"start": 0.9, "end": 1.0}}))
    assert_located_failure(run_train(path), path, "momentum", "objectives.jepa.momentum",
                           "replays the momentum it recorded", tmp_path)


# ------------------------------------------------------------------------------------------------- CUDA only
def graphed_run(tmp_path, monkeypatch, name, cuda_graph, stop_after=None, resume=False, steps=6, **overrides):
    """Tiny Hymba+ on the GPU, `steps` steps of 2 micro-batches, a record every step; returns (result, the GraphedStep)."""
    made = []

    class Spied(GraphedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(loop, "GraphedStep", Spied)
    corpus = write_corpus(tmp_path / "data")
    recipe = recipe_dict(corpus, "hymba_plus", steps=steps, cuda_graph=cuda_graph, output=str(tmp_path / name), **overrides)
    result = train(write_recipe(tmp_path / f"{name}.yaml", recipe), stop_after=stop_after, resume=resume,
                   device="cuda", show_progress=False)
    return result, (made[0] if made else None)


@cuda
@pytest.mark.parametrize(("precision", "tolerance"), [("float32", 1e-5), ("bf16-autocast", 1e-3), ("bf16", 1e-3)])
def test_cuda_graph_trains_as_eager_steps(tmp_path, monkeypatch, precision, tolerance):
    """6 steps: 3 eager warm-ups, step 4 recorded and replayed, 5 and 6 replays (the learning rate changing every
    step through the tensor lr); every logged loss and the final weights as the eager run's."""
    eager, _ = graphed_run(tmp_path, monkeypatch, "eager", False, precision=precision)
    graphed, stepper = graphed_run(tmp_path, monkeypatch, "graphed", True, precision=precision)
    assert stepper.graph is not None and stepper.recorded_at == 3, "step 4 was recorded"
    a, b = losses(eager.output_dir), losses(graphed.output_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x["lr"] == y["lr"]
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=tolerance, abs=tolerance), (x["step"], key)
    first = load_file(str(eager.checkpoint / "model.safetensors"))
    second = load_file(str(graphed.checkpoint / "model.safetensors"))
    for key in first:
        torch.testing.assert_close(second[key].float(), first[key].float(), rtol=tolerance * 10, atol=tolerance * 10)


@cuda
def test_cuda_graph_run_resumes(tmp_path, monkeypatch):
    """A checkpoint of a graphed run (tensor learning rate, capturable optimizer state) saved after the recording,
    resumed in a new loop (which records again after its own warm-up) continues as the straight graphed run."""
    straight, _ = graphed_run(tmp_path, monkeypatch, "straight", True, precision="float32", steps=9)
    graphed_run(tmp_path, monkeypatch, "resumed", True, stop_after=5, precision="float32", steps=9)
    resumed, stepper = graphed_run(tmp_path, monkeypatch, "resumed", True, resume=True, precision="float32", steps=9)
    assert resumed.step == 9 and stepper.calls == 4
    a, b = losses(straight.output_dir), losses(resumed.output_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), (x["step"], key)
