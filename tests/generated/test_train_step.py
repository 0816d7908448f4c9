"""The generated package's CUDAGraphTrainStep (ops/training.py): every call a real training step, the same steps as an
eager loop; on CUDA the steps after the warm-up replayed from one recorded graph, and what a replay cannot follow (a
new shape, a changed float learning rate) refused with an error that says what to do."""

import copy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BAMBA_TOY = ("model.d_model=32", "model.vocab_size=64", "mixers.ssm.n_heads=2", "mixers.ssm.head_dim=32",
             "mixers.ssm.d_state=8", "mixers.ssm.chunk_size=8", "mixers.attn.n_heads=2", "mixers.attn.head_dim=16",
             "mixers.attn.n_kv_heads=1", "mixers.attn.rope.rotary_dim=16", "ffns.mlp.hidden=64", "layout.mixers=ssm,attn",
             "model.max_seq_len=64")


def eager_steps(model, optimizer, batches, max_grad_norm=None):
    losses = []
    for input_ids in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["hymba_plus", "bamba_1b"])
def test_the_steps_equal_an_eager_loop(build, spec, device):
    path = ROOT / ("specs" if spec == "hymba_plus" else "bench/specs") / f"{spec}.yaml"
    package = build(path, preset="tiny" if spec == "hymba_plus" else None, overrides=() if spec == "hymba_plus" else BAMBA_TOY)
    torch.manual_seed(0)
    model = package.Model().to(device).train()
    twin = copy.deepcopy(model)
    vocab = model.lm_head.weight.size(0)
    batches = [torch.randint(0, vocab, (2, 16), device=device) for _ in range(6)]
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=fused)

    step = package.CUDAGraphTrainStep(model, optimizer, max_grad_norm=1.0, warmup_steps=2)
    losses = [step(input_ids).clone() for input_ids in batches]
    expected = eager_steps(twin, twin_optimizer, batches, max_grad_norm=1.0)

    assert (step.graph is not None) == (device == "cuda")  # replayed from the third step on CUDA
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert losses[-1] < losses[0]  # it trains: six steps on six batches at lr 1e-3 lower the loss of a tiny model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording needs CUDA")
def test_a_replay_refuses_a_new_shape_and_a_changed_float_learning_rate(build):
    package = build(ROOT / "specs/hymba_plus.yaml")
    model = package.Model().cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = package.CUDAGraphTrainStep(model, optimizer, warmup_steps=1)
    batch = torch.randint(0, 256, (2, 16), device="cuda")
    step(batch)
    step(batch)  # recorded
    with pytest.raises(ValueError, match=r"recorded for \(2, 16\).*one CUDAGraphTrainStep per shape"):
        step(batch[:, :8])
    optimizer.param_groups[0]["lr"] = 5e-4
    with pytest.raises(ValueError, match=r"learning rate changed from 0.001 to 0.0005.*tensor"):
        step(batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording needs CUDA")
def test_a_tensor_learning_rate_changed_in_place_reaches_the_replays(build):
    package = build(ROOT / "specs/hymba_plus.yaml")
    model = package.Model().cuda().train()
    lr = torch.tensor(1e-3, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    step = package.CUDAGraphTrainStep(model, optimizer, warmup_steps=1)
    batch = torch.randint(0, 256, (2, 16), device="cuda")
    step(batch)
    step(batch)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0]["lr"].fill_(0.0)
    step(batch)
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)]
    assert not any(moved)  # lr 0 (AdamW's decay is lr-scaled too): the replay read the new rate


def test_warm_up_is_at_least_one_step(build):
    package = build(ROOT / "specs/hymba_plus.yaml")
    model = package.Model()
    with pytest.raises(ValueError, match="at least one eager step"):
        package.CUDAGraphTrainStep(model, torch.optim.AdamW(model.parameters()), warmup_steps=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording needs CUDA")
@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
                                            lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)], ids=["adam", "sgd"])
def test_unfused_optimizers_record_too(build, make_optimizer):
    """Adam's step counters start on the device (capturable set before the warm-up), SGD has no counters at all."""
    package = build(ROOT / "specs/hymba_plus.yaml")
    torch.manual_seed(0)
    model = package.Model().cuda().train()
    twin = copy.deepcopy(model)
    batches = [torch.randint(0, 256, (2, 16), device="cuda") for _ in range(4)]
    step = package.CUDAGraphTrainStep(model, make_optimizer(model.parameters()), warmup_steps=1)
    losses = [step(input_ids).clone() for input_ids in batches]
    assert step.graph is not None
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_steps(twin, make_optimizer(twin.parameters()), batches)),
                               rtol=1e-5, atol=1e-5)
