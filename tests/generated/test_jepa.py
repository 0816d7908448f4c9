"""The generated JEPA head (templates/components/heads/jepa.py.j2) in HNS-SS-JEPA-MoE (L2) and Nexus (VICReg).

Its parameters are the IR's table; its losses are the spec's terms with the spec's weights, computed only in training
mode on a context with the configured share of positions hidden; the target encoder is an exponential moving average
of the backbone (a copy of its modules made with the model, weights as buffers), outside model.parameters(), saved
and loaded with the model, also after a meta-device build and init_weights; and on a counting task the JEPA loss
falls over 100 steps while the target latents keep their spread.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from archgen.emit.plan import TEMPLATES
from archgen.pipeline import compile_spec
from tests.conftest import ROOT, assert_parameters_match_the_cost_model

HNS = str(ROOT / "specs" / "hns_ss_jepa_moe.yaml")
NEXUS = str(ROOT / "specs" / "nexus.yaml")
# Nexus without the model-level extras whose templates (other parts of issue 4) have not landed yet, if any.
NEXUS_BUILDABLE = [f"{field}=null" for field, kind in (("memory", "titans"), ("symbolic", "symbolic"))
                   if not (TEMPLATES / "components" / "extras" / f"{kind}.py.j2").exists()]


def jepa_ops(package):
    return importlib.import_module(f"{package.__name__}.ops.jepa")


def backbone_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if not name.startswith(("heads.", "lm_head."))}


def target_of(model) -> dict[str, torch.Tensor]:
    """The target's weights (its copies' derived buffers, RoPE tables, are not saved and not listed)."""
    return {name: t.detach().clone() for name, t in model.heads["jepa"].target.state_dict().items()}


def count_sequences(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod 32 with a random start and a step of 1, 2 or 3: from its two predecessors every
    token is determined, so a hidden token is predictable from its causal context."""
    start = torch.randint(0, 32, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % 32


def train_step(model, optimizer, tokens) -> dict[str, torch.Tensor]:
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    model.update_target()
    return out.aux_losses


# ------------------------------------------------------------------------------------------------------ structure
PARAMETER_CASES = {
    "hns-default": (HNS, []),
    "nexus-latent32-predictor3x48": (NEXUS, NEXUS_BUILDABLE + ["heads.jepa.latent_dim=32", "heads.jepa.predictor_layers=3",
                                                          "heads.jepa.predictor_hidden=48"]),
}


@pytest.mark.parametrize("spec, overrides", PARAMETER_CASES.values(), ids=list(PARAMETER_CASES))
def test_parameters_are_the_ir_table_and_the_target_is_not_among_them(spec, overrides, build):
    model = build(spec, overrides=overrides).Model()
    ir = compile_spec(spec, "tiny", tuple(overrides)).ir
    assert_parameters_match_the_cost_model(model, ir)
    assert set(target_of(model)) == backbone_names(model), "the Model makes the target's copies when it is built"
    assert not any(name.startswith("heads.jepa.target.") for name, _ in model.named_parameters())


def test_only_the_configured_objectives_are_imported_and_returned(build):
    hns, nexus = build(HNS), build(NEXUS, overrides=NEXUS_BUILDABLE)
    tokens = torch.randint(0, 256, (2, 12))
    assert {k for k in hns.Model()(tokens, targets=tokens).aux_losses if k.startswith("jepa")} == {"jepa_l2"}
    assert {k for k in nexus.Model()(tokens, targets=tokens).aux_losses if k.startswith("jepa")} == {
        "jepa_vicreg_invariance", "jepa_vicreg_variance", "jepa_vicreg_covariance"}
    import_line = next(line for line in open(f"{hns.__path__[0]}/model.py") if "ops.jepa" in line)
    assert "vicreg_terms" not in import_line, "an L2-only model must not import what it does not use"


# ------------------------------------------------------------------------------------------------------ losses
def test_losses_are_the_spec_terms_with_the_spec_weights(build):
    weights = ["heads.jepa.loss_weight=0.5", "heads.jepa.l2_weight=2.0", "heads.jepa.vicreg_invariance_weight=3.0",
               "heads.jepa.vicreg_variance_weight=4.0", "heads.jepa.vicreg_covariance_weight=5.0"]
    package = build(NEXUS, overrides=NEXUS_BUILDABLE + weights + ["heads.jepa.latent_dim=32"])
    torch.manual_seed(0)
    model = package.Model()
    head = model.heads["jepa"]
    tokens = torch.randint(0, 256, (3, 20))
    got = head.masked_losses(model, tokens, generator=torch.Generator().manual_seed(7))

    ops = jepa_ops(package)
    mask = ops.random_mask(3, 20, 0.15, torch.Generator().manual_seed(7))
    embeddings = torch.where(mask[..., None], head.mask_token.weight, model.embed(tokens))
    predictions = head(model.hidden_states(inputs_embeds=embeddings)[mask])
    targets = F.layer_norm(head.target_projection(head.target.hidden_states(model, tokens)[mask]), (32,))
    invariance, variance, covariance = ops.vicreg_terms(predictions, targets)
    expected = {
        "jepa_l2": 0.5 * 2.0 * F.mse_loss(predictions, targets),
        "jepa_vicreg_invariance": 0.5 * 3.0 * invariance,
        "jepa_vicreg_variance": 0.5 * 4.0 * variance,
        "jepa_vicreg_covariance": 0.5 * 5.0 * covariance,
    }
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=lambda detail, name=name: f"{name}: {detail}")


def test_jepa_losses_are_computed_in_training_mode_only(build):
    model = build(HNS).Model()
    tokens = torch.randint(0, 256, (2, 12))
    train = model(tokens, targets=tokens)
    assert "jepa_l2" in train.aux_losses and train.heads["jepa"].shape == (2, 12, 64)
    model.eval()
    evaluation = model(tokens, targets=tokens)
    assert "jepa_l2" not in evaluation.aux_losses
    assert torch.equal(evaluation.heads["jepa"], model.heads["jepa"](model.hidden_states(tokens)))


MASK_CASES = {  # (mask_ratio override, T, hidden positions per row: ratio·T rounded half up, at least one)
    "default-T20": (None, 20, 3),
    "default-T7": (None, 7, 1),
    "ratio0.3-T20": (0.3, 20, 6),
    "ratio0.5-T9": (0.5, 9, 5),
}


@pytest.mark.parametrize("ratio, length, hidden", MASK_CASES.values(), ids=list(MASK_CASES))
def test_training_hides_the_configured_share_of_positions_in_every_row(ratio, length, hidden, build):
    overrides = [] if ratio is None else [f"heads.jepa.mask_ratio={ratio}"]
    model = build(HNS, overrides=overrides).Model()
    mask_token = model.heads["jepa"].mask_token.weight
    contexts = []
    backbone = model.hidden_states

    def recording_hidden_states(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            contexts.append(kwargs["inputs_embeds"].detach())
        return backbone(*args, **kwargs)

    model.hidden_states = recording_hidden_states
    tokens = torch.randint(0, 256, (4, length))
    model(tokens, targets=tokens)
    (context,) = contexts
    assert (context == mask_token).all(dim=-1).sum(dim=1).tolist() == [hidden] * 4


def test_a_mask_generator_makes_the_losses_reproducible(build):
    package = build(HNS)
    tokens = torch.randint(0, 256, (2, 16))
    losses = []
    for run, seed in enumerate((3, 3, 4)):
        torch.manual_seed(0)
        model = package.Model()
        model.heads["jepa"].mask_generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(100 + run)  # the global RNG's state must not matter
        losses.append(model(tokens, targets=tokens).aux_losses["jepa_l2"])
    assert losses[0] == losses[1] and losses[0] != losses[2]


# ------------------------------------------------------------------------------------------------------ target encoder
def test_update_target_is_the_ema_of_the_backbone_tensor_by_tensor(build):
    torch.manual_seed(0)
    model = build(HNS).Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (2, 12))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert all(torch.equal(t, start[name]) for name, t in target_of(model).items()), "the target starts as the backbone"
    out = model(tokens, targets=tokens)
    out.loss.backward()
    optimizer.step()
    for momentum in (None, 0.5):
        before = target_of(model)
        # The training hook every model has runs update_target with the spec's momentum.
        model.after_optimizer_step() if momentum is None else model.update_target(momentum=momentum)
        m = 0.996 if momentum is None else momentum  # the spec's ema_momentum is the default
        online = dict(model.named_parameters())
        for name, t in target_of(model).items():
            expected = m * before[name] + (1 - m) * online[name].detach()
            torch.testing.assert_close(t, expected, msg=lambda detail, name=name, m=m: f"{name}, m={m}: {detail}")


def test_after_a_meta_device_build_init_weights_makes_the_target_the_backbone(build):
    with torch.device("meta"):
        model = build(HNS).Model()
    assert set(target_of(model)) == backbone_names(model), "the structure, without values"
    model.to_empty(device="cpu")
    model.init_weights()
    online = dict(model.named_parameters())
    for name, t in target_of(model).items():
        assert torch.equal(t, online[name]), name


def test_the_target_takes_no_gradient(build):
    model = build(HNS).Model()
    tokens = torch.randint(0, 256, (2, 12))
    model(tokens, targets=tokens).loss.backward()
    target = list(model.heads["jepa"].target.buffers())
    assert target and all(not t.requires_grad and t.grad is None for t in target)
    assert model.heads["jepa"].mask_token.weight.grad is not None, "the online side does train"


def test_the_target_is_saved_and_loaded_with_the_model(build, tmp_path):
    package = build(HNS)
    model = package.Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(model, optimizer, count_sequences(2, 13, generator))
    assert any(not torch.equal(t, dict(model.named_parameters())[name]) for name, t in target_of(model).items())
    model.save_pretrained(tmp_path / "checkpoint")
    loaded = package.Model.from_pretrained(tmp_path / "checkpoint")
    assert target_of(loaded).keys() == target_of(model).keys()
    for name, t in target_of(model).items():
        assert torch.equal(target_of(loaded)[name], t), name
    tokens = count_sequences(2, 13, generator)
    original, restored = (m.heads["jepa"].masked_losses(m, tokens, generator=torch.Generator().manual_seed(1))
                          for m in (model, loaded))
    assert torch.equal(original["jepa_l2"], restored["jepa_l2"])


# ------------------------------------------------------------------------------------------------------ training
# Collapse threshold. The targets are standardised per position, so over N positions the mean per-dimension variance
# is 1 − mean_j(μ_j²), μ_j being dimension j's mean over positions: the mean per-dimension std is about 1 when
# positions differ in every dimension and 0 when every position has the same latent. At 0.5, at least a quarter of
# each latent's energy still varies between positions. Untrained it is 0.74 to 0.98; after these 100 steps 0.73 to
# 0.88 (measured over seeds 0-3 when this was written).
MIN_TARGET_STD = 0.5
TRAINING_CASES = {"hns-l2": (HNS, []), "nexus-vicreg": (NEXUS, NEXUS_BUILDABLE)}


@pytest.mark.parametrize("spec, overrides", TRAINING_CASES.values(), ids=list(TRAINING_CASES))
def test_training_lowers_the_jepa_loss_without_collapsing_the_latents(spec, overrides, build):
    """100 steps of the model's own loss with update_target after each; the JEPA loss on held-out sequences falls by
    at least a fifth (to 0.55-0.65 of its start for both objectives, seeds 0-3, when this was written)."""
    torch.manual_seed(0)
    model = build(spec, overrides=overrides).Model()
    head = model.heads["jepa"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    held_out = count_sequences(16, 16, torch.Generator().manual_seed(1))

    @torch.no_grad()
    def probe() -> tuple[float, float]:
        """(JEPA loss on the held-out sequences with a fixed mask, mean per-dimension std of their target latents)."""
        loss = sum(head.masked_losses(model, held_out, generator=torch.Generator().manual_seed(2)).values()).item()
        latents = F.layer_norm(head.target.hidden_states(model, held_out), (model.embed.weight.size(1),))
        return loss, latents.flatten(0, 1).std(dim=0).mean().item()

    loss_before, std_before = probe()  # also makes the target: a copy of the untrained backbone
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        train_step(model, optimizer, count_sequences(8, 17, generator))
    loss_after, std_after = probe()
    assert loss_after < 0.8 * loss_before, f"JEPA loss {loss_before:.3f} -> {loss_after:.3f}"
    assert std_after > MIN_TARGET_STD, f"latents collapsed: per-dimension std {std_before:.3f} -> {std_after:.3f}"
