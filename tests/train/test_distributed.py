"""The torchrun path on CPU: 2 processes with gloo shard the model with FSDP2, save torch.distributed.checkpoint
shards and a full model.safetensors, and the checkpoint resumes on ONE process without torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from archgen.train.loop import train
from archgen.train.metrics import read_metrics
from tests.train.recipes import ROOT, recipe_dict, write_corpus, write_recipe

# Next-token losses of 1 and 2 processes once JEPA masks have differed (lr 1e-2, momentum 0.5): 5.9e-3 at step 2,
# 4.0e-3 at step 3 (torch 2.13, CPU).
JEPA_MASK_TOLERANCE = 2e-2


def run(args, timeout=900):
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_two_processes_with_fsdp_then_resume_on_one(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    # 2 × 16 tokens per micro-batch × 2 processes = 64 tokens per step: no accumulation on 2 processes, 2 on one.
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, steps=4, batch__tokens=64))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "archgen", "train",
         str(recipe), "--no-progress", "--device", "cpu", "--stop-after", "2"])
    checkpoint = tmp_path / "data" / "run" / "checkpoints" / "step-00000002"
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["sharded"]
    assert (checkpoint / "distributed" / ".metadata").exists()
    assert {"rng.rank0.safetensors", "rng.rank1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    full = load_file(str(checkpoint / "model.safetensors"))
    assert full["embed.weight"].shape == (256, 64), "the full (unsharded) weights"

    done = run([sys.executable, "-m", "archgen", "train", str(recipe), "--no-progress", "--device", "cpu", "--resume"])
    assert "resumed from" in done.stderr
    rows = [r for r in read_metrics(tmp_path / "data" / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    final = tmp_path / "data" / "run" / "checkpoints" / "step-00000004"
    resumed = load_file(str(final / "model.safetensors"))
    assert not torch.equal(resumed["embed.weight"], full["embed.weight"]), "training continued from the sharded checkpoint"
    assert rows[-1]["next_token_loss"] < rows[0]["next_token_loss"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_jepa_under_fsdp_follows_one_process_and_its_target_resumes_on_one(tmp_path, monkeypatch):
    """HNS-SS-JEPA-MoE on 2 processes with FSDP2: the target encoder (a whole copy on each process, updated from the
    gathered online weights) follows θ̄ ← m·θ̄ + (1 − m)·θ and is saved in the checkpoint, and training matches one
    process: exactly at the first step, within the JEPA masks' difference after it (each process draws its
    micro-batch's masks from its own generator, one process draws both in turn)."""
    corpus = write_corpus(tmp_path / "data")
    common = dict(spec="hns_ss_jepa_moe", steps=3, batch__tokens=64, checkpoint__interval=1,
                  objectives__jepa={"momentum": {"start": 0.5, "end": 0.5}})  # a target that moves fast
    alone = write_recipe(tmp_path / "alone.yaml", recipe_dict(corpus, output=str(tmp_path / "alone"), **common))
    sharded = write_recipe(tmp_path / "sharded.yaml", recipe_dict(corpus, output=str(tmp_path / "sharded"), **common))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train(alone, device="cpu", show_progress=False)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "archgen", "train",
         str(sharded), "--no-progress", "--device", "cpu", "--stop-after", "2"])
    checkpoint = tmp_path / "sharded" / "checkpoints" / "step-00000002"
    assert json.loads((checkpoint / "trainer.json").read_text())["sharded"]
    (target_1, _), (target_2, online_2) = (_target_and_online(checkpoint.parent / f"step-0000000{step}") for step in (1, 2))
    assert target_2.keys() == online_2.keys(), "a copy of every backbone weight"
    for name, online in online_2.items():
        torch.testing.assert_close(target_2[name], 0.5 * target_1[name] + 0.5 * online, rtol=1e-6, atol=1e-7)
        assert not torch.equal(target_2[name], online), name

    train(sharded, device="cpu", show_progress=False, resume=True)  # step 3 on one process, from the shards
    expected, got = (_step_losses(tmp_path / run_dir) for run_dir in ("alone", "sharded"))
    assert sorted(got) == [1, 2, 3] and "jepa_l2" in got[1]
    assert got[1]["next_token_loss"] == pytest.approx(expected[1]["next_token_loss"], abs=1e-5)
    for step in (2, 3):
        assert got[step]["next_token_loss"] == pytest.approx(expected[step]["next_token_loss"], abs=JEPA_MASK_TOLERANCE)


def _target_and_online(checkpoint):
    """({backbone name: target weight}, {backbone name: online weight}) from a checkpoint's model.safetensors."""
    full = load_file(str(checkpoint / "model.safetensors"))
    target = {name.removeprefix("heads.jepa.target."): t for name, t in full.items() if name.startswith("heads.jepa.target.")}
    online = {name: t for name, t in full.items() if not name.startswith(("heads.", "lm_head."))}
    return target, online


def _step_losses(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
