"""
Tests for templates/runtime/jepa.py, the JEPA head's pieces copied into every generated package with a `jepa` head.

VICReg is checked against the paper's formulas written out as loops over dimensions and pairs of dimensions. The EMA
target is checked on a toy model with the generated model's layout (embed, layers, norm_f, lm_head, heads) against
θ̄ ← m·θ̄ + (1 − m)·θ computed tensor by tensor, and against the same model run with the target's weights
loaded.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from templates.runtime import jepa


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------------ random_mask
MASK_CASES = [  # (batch, length, ratio, hidden per row): round half up, at least one
    (3, 20, 0.15, 3),
    (5, 63, 0.15, 9),
    (2, 10, 0.25, 3),
    (4, 5, 0.15, 1),
    (2, 3, 0.1, 1),
    (2, 7, 0.9, 6),
]


@pytest.mark.parametrize("batch, length, ratio, hidden", MASK_CASES,
                         ids=[f"B{b}-T{t}-ratio{r}" for b, t, r, _ in MASK_CASES])
def test_random_mask_hides_the_rounded_ratio_in_every_row(batch, length, ratio, hidden):
    mask = jepa.random_mask(batch, length, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (batch, length) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [hidden] * batch


def test_random_mask_hides_every_position_equally_often():
    """4000 rows of 10 at ratio 0.3: each position's hidden frequency is 0.3 ± 0.03 (over 4 standard errors)."""
    mask = jepa.random_mask(4000, 10, 0.3, torch.Generator().manual_seed(1))
    frequency = mask.double().mean(dim=0)
    assert (frequency - 0.3).abs().max() < 0.03, frequency.tolist()


def test_random_mask_repeats_with_the_same_generator_seed_only():
    def draw(seed):
        return jepa.random_mask(8, 32, 0.15, torch.Generator().manual_seed(seed), device="cpu")

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1])
def test_random_mask_rejects_a_ratio_outside_the_open_unit_interval(ratio):
    with pytest.raises(ValueError, match=f"mask ratio must be in \\(0, 1\\), got {ratio}"):
        jepa.random_mask(2, 8, ratio)


# ------------------------------------------------------------------------------------------------------ VICReg
def vicreg_by_hand(p, z, eps=1e-4):
    """The three terms of Bardes et al. (2022), one dimension and one pair of dimensions at a time."""
    n, dim = p.shape

    def covariance(x, i, j):
        return ((x[:, i] - x[:, i].mean()) * (x[:, j] - x[:, j].mean())).sum() / (n - 1)

    def std_hinge(x):
        return sum(F.relu(1 - torch.sqrt(covariance(x, j, j) + eps)) for j in range(dim)) / dim

    def off_diagonal(x):
        return sum(covariance(x, i, j) ** 2 for i in range(dim) for j in range(dim) if i != j) / dim

    invariance = ((p - z) ** 2).sum() / (n * dim)
    return invariance, (std_hinge(p) + std_hinge(z)) / 2, off_diagonal(p) + off_diagonal(z)


# Spread 0.3: every dimension is under the hinge's std of 1; spread 3: none is, so only a few terms contribute.
@pytest.mark.parametrize("n, dim, spread", [(37, 13, 0.3), (37, 13, 3.0), (2, 5, 1.0), (64, 3, 1.0)],
                         ids=lambda v: str(v))
def test_vicreg_terms_and_their_gradients_match_the_formulas(n, dim, spread):
    p = (spread * randn(n, dim, seed=n) + randn(1, dim, seed=1)).requires_grad_()
    z = spread * randn(n, dim, seed=n + 1) @ randn(dim, dim, seed=2) / math.sqrt(dim)  # correlated dimensions
    weights = torch.tensor([25.0, 25.0, 1.0], dtype=torch.float64)
    got = torch.stack(jepa.vicreg_terms(p, z))
    (grad_got,) = torch.autograd.grad((weights * got).sum(), p)
    expected = torch.stack(vicreg_by_hand(p, z))
    (grad_expected,) = torch.autograd.grad((weights * expected).sum(), p)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-10, atol=1e-12)


def test_vicreg_of_a_single_row_is_finite_and_counts_it_as_no_spread():
    invariance, variance, covariance = jepa.vicreg_terms(randn(1, 4), randn(1, 4, seed=1))
    assert torch.isfinite(invariance)
    assert variance.item() == pytest.approx(1 - math.sqrt(1e-4))
    assert covariance.item() == 0


def test_vicreg_of_bfloat16_inputs_is_computed_in_float32():
    terms = jepa.vicreg_terms(randn(16, 8).bfloat16(), randn(16, 8, seed=1).bfloat16())
    assert all(term.dtype == torch.float32 for term in terms)
    expected = vicreg_by_hand(randn(16, 8).bfloat16().double(), randn(16, 8, seed=1).bfloat16().double())
    torch.testing.assert_close(torch.stack(terms).double(), torch.stack(expected), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ EMA target
class ToyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.predictor = nn.Linear(6, 6)
        self.target = jepa.EMATarget()


class ToyModel(nn.Module):
    """The generated Model's layout in miniature: a backbone (embed, meta_tokens, layers, norm_f), lm_head, heads;
    like the generated Model, it makes its JEPA target (reset_target) once its weights are set."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.meta_tokens = nn.Parameter(torch.randn(2, 6))  # a parameter with no dotted prefix
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(2)])
        self.norm_f = nn.LayerNorm(6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.heads = nn.ModuleDict({"jepa": ToyHead()})
        self.heads["jepa"].target.reset_(self)

    def hidden_states(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = torch.cat([self.meta_tokens.expand(x.size(0), -1, -1), x], dim=1)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.norm_f(x)[:, 2:]


BACKBONE = ["embed.weight", "meta_tokens", "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
            "norm_f.weight", "norm_f.bias"]


def make_toy(seed=0, tied=False):
    torch.manual_seed(seed)
    return ToyModel(tied)


def target_of(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.heads["jepa"].target.named_buffers()}


def perturb_(model, seed):
    """Stand-in for an optimizer step: move every parameter by a random amount."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_target_mirrors_the_backbone_and_starts_equal_to_it(tied):
    model = make_toy(tied=tied)
    target = target_of(model)
    assert sorted(target) == sorted(BACKBONE), "embedding, layers and final norm; never heads or the unembedding"
    for name, p in model.named_parameters():
        if name in target:
            assert torch.equal(target[name], p), name
            assert target[name].data_ptr() != p.data_ptr(), f"{name}: a copy, not the online tensor"


def test_the_target_is_a_copy_of_the_backbone_modules_with_weights_as_buffers():
    model = make_toy()
    ema = model.heads["jepa"].target
    assert [name for name, _ in ema.named_children()] == ["embed", "layers", "norm_f"]
    assert type(ema.layers[0]) is nn.Linear and not list(ema.parameters())


def test_reset_makes_the_target_equal_to_the_backbone_again():
    model = make_toy()
    perturb_(model, seed=0)
    model.heads["jepa"].target.reset_(model)
    for name, p in model.named_parameters():
        if name in BACKBONE:
            assert torch.equal(target_of(model)[name], p), name


def test_update_follows_the_ema_formula_tensor_by_tensor():
    model = make_toy()
    ema = model.heads["jepa"].target
    for step, momentum in enumerate([0.9, 0.5, 0.996]):
        perturb_(model, seed=step)
        before, online = target_of(model), dict(model.named_parameters())
        ema.update_(model, momentum)
        after = target_of(model)
        for name in BACKBONE:
            expected = momentum * before[name] + (1 - momentum) * online[name].detach()
            torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7,
                                       msg=lambda detail, name=name, momentum=momentum: f"{name}, m={momentum}: {detail}")


def test_a_bfloat16_target_follows_small_steps_that_bfloat16_alone_would_round_away():
    """m = 0.996 and online weights about 1% off the target: each step moves θ̄ by ~4e-5 relative, under bf16's
    half-ulp (2e-3), so an update in bf16 leaves θ̄ where it was; the float32 accumulator moves it as float32 does."""
    model = make_toy().to(torch.bfloat16)
    reference = make_toy()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            q.copy_(p.float())
    start = target_of(model)
    with torch.no_grad():
        for p in (*model.parameters(), *reference.parameters()):
            p.add_(0.01 * p.abs() + 1e-3)
    for _ in range(200):
        model.heads["jepa"].target.update_(model, 0.996)
        reference.heads["jepa"].target.update_(reference, 0.996)
    moved, expected = target_of(model), target_of(reference)
    for name in BACKBONE:
        assert not torch.equal(moved[name], start[name]), f"{name}: the bf16 target did not move"
        # within 2 bf16 ulps: the online bf16 weights are rounded too
        torch.testing.assert_close(moved[name].float(), expected[name], rtol=2**-7, atol=1e-6, msg=name)


def test_a_bfloat16_target_written_from_outside_restarts_its_accumulator():
    """A load_state_dict between updates (a resume) must win over the accumulator of the earlier updates."""
    model = make_toy().to(torch.bfloat16)
    ema = model.heads["jepa"].target
    perturb_(model, seed=0)
    ema.update_(model, 0.5)
    loaded = {f"heads.jepa.target.{name}": torch.zeros_like(t) for name, t in target_of(model).items()}
    model.load_state_dict(loaded, strict=False)
    ema.update_(model, 0.5)
    for name, p in model.named_parameters():
        if name in BACKBONE:
            torch.testing.assert_close(target_of(model)[name], (0.5 * p.float()).to(torch.bfloat16), rtol=0, atol=0)


def test_an_update_before_the_copy_exists_says_what_to_call():
    model = make_toy()
    with pytest.raises(RuntimeError, match=r"no copy of the backbone yet: call reset_\(model\) first"):
        jepa.EMATarget().update_(model, 0.5)


def test_target_pass_is_the_model_run_with_the_target_weights():
    model = make_toy()
    ema = model.heads["jepa"].target
    perturb_(model, seed=0)
    ema.update_(model, 0.5)  # now the target is halfway between two weight sets
    ids = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    twin.load_state_dict({**twin.state_dict(), **target_of(model)})
    expected = twin.hidden_states(ids)
    torch.testing.assert_close(ema.hidden_states(model, ids), expected, rtol=0, atol=0)
    assert not torch.allclose(model.hidden_states(ids), expected), "the online weights must differ from the target's"


def test_target_takes_no_gradient_and_is_not_a_parameter():
    model = make_toy()
    ema = model.heads["jepa"].target
    latents = ema.hidden_states(model, torch.tensor([[1, 2, 3]]))
    assert not latents.requires_grad
    parameter_ids = {id(p) for p in model.parameters()}
    assert all(not t.requires_grad and id(t) not in parameter_ids for t in ema.buffers())
    model.hidden_states(torch.tensor([[1, 2, 3]])).sum().backward()  # the online pass still trains
    assert model.embed.weight.grad is not None


def test_target_is_saved_and_loaded_with_the_state_dict():
    model = make_toy(seed=0)
    perturb_(model, seed=1)
    model.heads["jepa"].target.update_(model, 0.5)
    saved = model.state_dict()
    assert {f"heads.jepa.target.{name}" for name in BACKBONE} <= set(saved)

    fresh = make_toy(seed=1)
    fresh.load_state_dict(saved)
    for name, t in target_of(model).items():
        assert torch.equal(target_of(fresh)[name], t), name


def test_a_target_loaded_in_another_dtype_follows_the_backbone():
    model = make_toy().double()
    fresh = make_toy()
    fresh.load_state_dict(model.state_dict())  # float64 checkpoint into a float32 model
    latents = fresh.heads["jepa"].target.hidden_states(fresh, torch.tensor([[1, 2]]))
    assert latents.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in fresh.heads["jepa"].target.buffers())
