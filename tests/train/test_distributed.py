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

from archgen.train.metrics import read_metrics
from tests.train.recipes import ROOT, recipe_dict, write_corpus, write_recipe


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
