"""`compile: true` under torch.distributed on CPU: 2 gloo processes with compiled layers, sharded by FSDP2, replicated
by DDP or split by tensor parallelism, train as one eager process does, with one graph per layer class in each
process.

The layers are compiled before FSDP2, DDP or the tensor-parallel plan wrap them, so a graph runs under FSDP2's hooks
(run eagerly, dynamo skips them) or DDP's gradient hooks, or traces DTensor weights. aot_eager stands in for
inductor: it traces forward and backward as inductor does but generates no code (inductor on a CPU takes minutes);
tests/generated/test_compile.py runs inductor.
The processes are started with torch.multiprocessing, not torchrun, so each can swap in that backend first; the
environment they get is torchrun's (RANK, WORLD_SIZE, MASTER_ADDR, ...), which is all `archgen train` reads.
"""

from __future__ import annotations

import functools
import json
import os
import socket

import pytest
import torch

from archgen.train.loop import train
from archgen.train.metrics import read_metrics
from tests.train.recipes import recipe_dict, write_corpus, write_recipe

# Two attention (4 query heads, 2 key/value heads, qk-norm) + SwiGLU layers of one class: one graph, and every layer
# has a tensor-parallel split.
ATTENTION_ONLY = dict(spec="gated_deltanet_hybrid", spec__set=["layout.mixers=attn", "layout.n_layers=2"], steps=3,
                      batch__tokens=64)
PROCESSES = 2


def train_compiled(rank: int, world_size: int, port: int, recipe: str, graphs: str) -> None:
    """One process of `archgen train` as torchrun would start it, its layers compiled with aot_eager; writes how many
    graphs dynamo made to `graphs` (formatted with the rank)."""
    from torch._dynamo.utils import counters

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    train(recipe, device="cpu", show_progress=False)
    with open(graphs.format(rank=rank), "w") as file:
        json.dump(counters["stats"]["unique_graphs"], file)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
@pytest.mark.parametrize("split", [{}, {"distributed__fsdp": False}, {"distributed__tensor_parallel": 2}],
                         ids=["fsdp2", "ddp", "tp2"])
def test_compiled_layers_on_two_processes_train_as_one_eager_process(tmp_path, monkeypatch, split):
    corpus = write_corpus(tmp_path / "data")
    eager = write_recipe(tmp_path / "eager.yaml", recipe_dict(corpus, output=str(tmp_path / "eager"), **ATTENTION_ONLY))
    compiled = write_recipe(tmp_path / "compiled.yaml", recipe_dict(corpus, output=str(tmp_path / "compiled"),
                                                                    compile=True, **split, **ATTENTION_ONLY))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train(eager, device="cpu", show_progress=False)

    graphs = str(tmp_path / "graphs.{rank}.json")
    torch.multiprocessing.spawn(train_compiled, args=(PROCESSES, free_port(), str(compiled), graphs), nprocs=PROCESSES)
    trainer = json.loads((tmp_path / "compiled" / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert trainer["world_size"] == PROCESSES and trainer["sharded"] == split.get("distributed__fsdp", True)
    assert trainer["tensor_parallel"] == split.get("distributed__tensor_parallel", 1)
    for rank in range(PROCESSES):
        with open(graphs.format(rank=rank)) as file:
            assert json.load(file) == 1, f"process {rank}: one graph for the model's one layer class"
    expected, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), (step, got, expected)
