"""Expert parallelism under torchrun on CPU (`distributed.expert_parallel: true`): 2 gloo processes each hold half of
every MoE layer's experts, send each token's rows to the process holding its experts and back (all_to_all), train
exactly as one process does, and their checkpoint resumes on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from archgen.train.distributed import expert_parallel_problems
from archgen.train.loop import train
from archgen.train.metrics import read_metrics
from tests.train.recipes import ROOT, recipe_dict, write_corpus, write_recipe

# Two attention + MoE (4 experts, top-2) layers. The JEPA head's masks differ between 1 and 2 processes (each draws
# its own); weighted 0, its loss leaves the weights alone, so the runs can be compared exactly. AdamW's eps 1e-4: its
# first step moves every weight by about ±lr whatever its gradient's size, so a router gradient near zero, whose sign
# the order of a sum decides, would move it by ±lr one way or the other (2·lr apart, seen under FSDP).
MOE = dict(spec="hns_ss_jepa_moe", spec__set=["layout.mixers=attn", "layout.n_layers=2"], objectives__heads={"jepa": 0.0},
           steps=3, batch__tokens=64, optimizer__eps=1e-4)


def losses(run_dir):
    return {r["step"]: r["next_token_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def torchrun(recipe, *extra):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "archgen", "train", str(recipe), "--no-progress", "--device", "cpu", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_experts_across_two_processes_match_one_process_and_resume_on_one(tmp_path, monkeypatch, fsdp):
    corpus = write_corpus(tmp_path / "data")
    reference = write_recipe(tmp_path / "reference.yaml", recipe_dict(corpus, output=str(tmp_path / "reference"), **MOE))
    spread = write_recipe(tmp_path / "spread.yaml", recipe_dict(corpus, output=str(tmp_path / "spread"),
                                                                distributed__expert_parallel=True,
                                                                distributed__fsdp=fsdp, **MOE))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train(reference, device="cpu", show_progress=False)

    done = torchrun(spread, "--stop-after", "2")
    assert "expert parallel: 2 MoE layers' experts spread over 2 processes" in done.stderr
    checkpoint = tmp_path / "spread" / "checkpoints" / "step-00000002"
    assert json.loads((checkpoint / "trainer.json").read_text())["sharded"]
    full = load_file(str(checkpoint / "model.safetensors"))
    assert full["layers.0.ffn.w_in"].shape[0] == 4, "the full model holds every expert"

    train(spread, device="cpu", show_progress=False, resume=True)  # step 3 on one process, from the spread shards
    expected, got = losses(tmp_path / "reference"), losses(tmp_path / "spread")
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), (step, got, expected)
    aux = {r["step"]: r["moe_z_loss"] for r in read_metrics(tmp_path / "spread" / "metrics.jsonl") if "loss" in r}
    alone = {r["step"]: r["moe_z_loss"] for r in read_metrics(tmp_path / "reference" / "metrics.jsonl") if "loss" in r}
    assert aux[1] == pytest.approx(alone[1], rel=1e-5), "every layer's router losses, not the first layer's alone"


class _Experts(nn.Module):
    expert_plan = {"w_in": 6, "w_out": 6}

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.zeros(6, 2, 4))
        self.w_out = nn.Parameter(torch.zeros(6, 4, 2))


def test_experts_that_do_not_divide_over_the_processes_are_named():
    model = nn.Module()
    model.moe = _Experts()
    assert expert_parallel_problems(model, 4) == ["moe (_Experts) has 6 experts, not divisible by 4 processes"]
    assert expert_parallel_problems(model, 3) == []
