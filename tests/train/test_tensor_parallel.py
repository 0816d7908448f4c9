"""Tensor parallelism under torchrun on CPU: 2 gloo processes split attention heads and MLP hidden features
(`distributed.tensor_parallel: 2`), alone or as a 2 × 2 (data × tensor) mesh of 4 with FSDP2 over the data dimension;
they train exactly as one process does, and their checkpoint resumes on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from archgen.errors import CompileError
from archgen.train.checks import plan_training
from archgen.train.distributed import tensor_parallel_problems
from archgen.train.loop import train
from archgen.train.metrics import read_metrics
from archgen.train.recipe import load_recipe
from tests.train.recipes import ROOT, recipe_dict, write_corpus, write_recipe

# Two attention (4 query heads, 2 key/value heads, qk-norm) + SwiGLU layers: every layer has a split module.
ATTENTION_ONLY = ["layout.mixers=attn", "layout.n_layers=2"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
@pytest.mark.parametrize("processes", [2, 4], ids=["tp2", "dp2-x-tp2"])
def test_two_way_tensor_parallel_matches_one_process_and_resumes_on_one(tmp_path, monkeypatch, processes):
    """2 processes: one tensor-parallel group; 4: a 2 × 2 mesh, FSDP2 over 2 data-parallel groups of 2 split ranks."""
    corpus = write_corpus(tmp_path / "data")
    common = dict(spec="gated_deltanet_hybrid", steps=3, batch__tokens=64, spec__set=ATTENTION_ONLY)
    alone = write_recipe(tmp_path / "alone.yaml", recipe_dict(corpus, output=str(tmp_path / "alone"), **common))
    split = write_recipe(tmp_path / "split.yaml", recipe_dict(corpus, output=str(tmp_path / "split"),
                                                              distributed__tensor_parallel=2, **common))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train(alone, device="cpu", show_progress=False)

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                           "-m", "archgen", "train", str(split), "--no-progress", "--device", "cpu", "--stop-after", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor parallel: 4 modules split 2 ways" in done.stderr
    assert (", FSDP" in done.stderr) == (processes == 4), "FSDP2 shards over the data dimension when it has 2 groups"
    checkpoint = tmp_path / "split" / "checkpoints" / "step-00000002"
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    assert trainer["tensor_parallel"] == 2 and trainer["world_size"] == processes and trainer["sharded"]
    assert (checkpoint / "distributed" / ".metadata").exists()

    train(split, device="cpu", show_progress=False, resume=True)  # step 3 on one process, from the split shards
    expected, got = losses(tmp_path / "alone"), losses(tmp_path / "split")
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), (step, got, expected)


class _Heads(nn.Module):
    tp_plan = {"q_proj": ("colwise", 4), "k_proj": ("colwise", 3), "o_proj": ("rowwise", 4)}

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)


def test_a_split_that_does_not_divide_is_named():
    model = nn.Module()
    model.block = _Heads()
    assert tensor_parallel_problems(model, 2) == [
        "block.k_proj (_Heads) splits into 3 units (heads or hidden features), not divisible by 2"]
    assert tensor_parallel_problems(model, 1) == []
    model.copy = _Heads()
    model.copy.q_proj = nn.Module()  # its weight a buffer, as in JEPA's target encoder: such a copy is never split
    model.copy.q_proj.register_buffer("weight", torch.ones(4, 4))
    assert len(tensor_parallel_problems(model, 2)) == 1, "a module without parameters is not split"


def test_processes_that_do_not_form_tensor_groups_are_a_located_error(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, spec="gated_deltanet_hybrid", spec__set=ATTENTION_ONLY,
                                                         distributed__tensor_parallel=2))
    with pytest.raises(CompileError) as error:
        plan_training(load_recipe(path), world_size=3)
    (problem,) = [d for d in error.value.diagnostics if d.path.startswith("distributed")]
    assert problem.path == "distributed.tensor_parallel" and "3 processes do not split" in problem.message
    assert problem.location.line == path.read_text().splitlines().index("  tensor_parallel: 2") + 1
