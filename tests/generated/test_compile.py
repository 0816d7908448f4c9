"""torch.compile of whole generated models, forward and backward, with fullgraph=True (a graph break is an error), in
eval mode and, for HSPMN and the JEPA specs, in training mode; and gradient checkpointing chosen by layer kind.

Every spec of specs/ and bench/specs/bamba_1b.yaml (the Mamba-2 SSD reference) at toy sizes. The backend is
"aot_eager" (dynamo's whole graph plus AOT autograd's joint forward/backward, without inductor's code generation),
except for one inductor test, the Mamba-2 model whose SSD cumsum crashed inductor on torch 2.11.
"""

from pathlib import Path

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.testing import CompileCounter
from torch.fx.experimental.proxy_tensor import make_fx

from templates.runtime import gated_delta, ssd
from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]
BAMBA_TOY = ("model.d_model=32", "model.vocab_size=64", "mixers.ssm.n_heads=2", "mixers.ssm.head_dim=32",
             "mixers.ssm.d_state=8", "mixers.ssm.chunk_size=8", "mixers.attn.n_heads=2", "mixers.attn.head_dim=16",
             "mixers.attn.n_kv_heads=1", "mixers.attn.rope.rotary_dim=16", "ffns.mlp.hidden=64", "layout.mixers=ssm*3,attn",
             "model.max_seq_len=64")
# (spec, preset, overrides): the fewest layers each layout allows, so that dynamo has little to trace
SPECS = {
    "hspmn": ("specs/hspmn.yaml", "tiny", ()),
    "hymba_plus": ("specs/hymba_plus.yaml", "tiny", ()),
    "gated_deltanet_hybrid": ("specs/gated_deltanet_hybrid.yaml", "tiny", ()),
    "hns_ss_jepa_moe": ("specs/hns_ss_jepa_moe.yaml", "tiny", ()),
    "nexus": ("specs/nexus.yaml", "tiny", ("layout.n_layers=8",)),
    "bamba": ("bench/specs/bamba_1b.yaml", None, BAMBA_TOY),
}
# Every spec is compiled in eval mode, where there is no router noise and no JEPA pass. Training mode adds those, and
# is compiled for HSPMN (its straight-through router) and for the JEPA specs (the masked pass and the target encoder's
# pass), which draw from torch's global generator in the same order compiled and eager, so the two are compared.
JEPA_SPECS = ("hns_ss_jepa_moe", "nexus")


def _model(build, name):
    spec, preset, overrides = SPECS[name]
    torch.manual_seed(0)
    return build(ROOT / spec, preset, overrides).Model()


def _loss_and_grads(model, forward, tokens):
    model.zero_grad(set_to_none=True)
    loss = forward(tokens[:, :-1], targets=tokens[:, 1:]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_whole_model_compiles_in_one_graph_forward_and_backward(build, name):
    model = _model(build, name)
    tokens = torch.randint(0, model.lm_head.weight.size(0), (2, 13))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    model.eval()  # deterministic: no router noise, no JEPA masks, so compiled and eager compute the same
    loss, grads = _loss_and_grads(model, compiled, tokens)
    expected_loss, expected_grads = _loss_and_grads(model, model, tokens)
    assert_close(loss, expected_loss, what=f"{name} loss")
    assert expected_grads.keys() <= grads.keys()
    for key, grad in grads.items():
        if key in expected_grads:
            assert_close(grad, expected_grads[key], what=f"{name} gradient of {key}")
        else:  # a head the loss does not read (JEPA's predictor in eval mode): AOT autograd gives zeros, eager None
            assert not grad.any(), key
    if name == "hspmn":
        model.train()  # noisy router with a straight-through gate: one graph too
        loss, grads = _loss_and_grads(model, compiled, tokens)
        assert torch.isfinite(loss) and expected_grads.keys() <= grads.keys()


@pytest.mark.parametrize("name", JEPA_SPECS)
def test_jepa_model_compiles_in_one_graph_in_training_mode(build, name):
    """The training forward and backward: LM loss, the masked context pass, the target encoder's pass on its copy of
    the backbone, the JEPA loss; then the EMA update moves the target, and the compiled model follows it."""
    model = _model(build, name)
    model.train()
    tokens = torch.randint(0, model.lm_head.weight.size(0), (2, 13))
    torch._dynamo.reset()
    graphs = []

    def counting_aot_eager(graph, inputs):
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, inputs)

    compiled = torch.compile(model, fullgraph=True, backend=counting_aot_eager)
    for step in range(2):
        torch.manual_seed(step)  # the same masks (and router draws) compiled and eager
        loss, grads = _loss_and_grads(model, compiled, tokens)
        torch.manual_seed(step)
        expected_loss, expected_grads = _loss_and_grads(model, model, tokens)
        assert_close(loss, expected_loss, what=f"{name} loss, step {step}")
        assert grads.keys() == expected_grads.keys()
        assert any(key.startswith("heads.jepa.predictor") for key in grads), "the JEPA loss trains the predictor"
        for key, grad in grads.items():
            assert_close(grad, expected_grads[key], what=f"{name} gradient of {key}, step {step}")
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(1e-2 * p.grad)
        model.update_target(0.5)  # in place on the target's buffers: the compiled graph reads them as they are
    assert len(graphs) == 1, "the second step reuses the graph (no recompilation after the updates)"


def test_mamba2_model_trains_under_inductor(build):
    """The SSD reference inside a whole model through inductor's code generation, the backend that crashed."""
    spec, preset, overrides = SPECS["bamba"]
    torch.manual_seed(0)
    model = build(ROOT / spec, preset, (*overrides, "layout.mixers=ssm,attn")).Model()  # two layers: inductor is slow
    tokens = torch.randint(0, model.lm_head.weight.size(0), (2, 21))  # 20 positions: two chunks of 8 and a tail
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = _loss_and_grads(model, compiled, tokens)
    expected_loss, expected_grads = _loss_and_grads(model, model, tokens)
    assert_close(loss, expected_loss, what="loss")
    for key, grad in grads.items():
        assert_close(grad, expected_grads[key], tol=1e-4, what=f"gradient of {key}")


def _ssd(x, dt, A, B, C):
    y, state = ssd.ssd_scan(x, dt, A, B, C, chunk_size=8)
    return y.sum() + state.sum()


def _gated_delta(x, dt, A, B, C):  # the same inputs, read as q = k = B, v = x's first head, g = dt·A, β = dt
    y, state = gated_delta.gated_delta_rule(B, B, x[:, :, 0, :].unsqueeze(2), dt[..., :1] * A[0], dt[..., :1], chunk_size=8)
    return y.sum() + state.sum()


@pytest.mark.parametrize("scan", [_ssd, _gated_delta], ids=["ssd", "gated_delta"])
def test_chunked_scans_hold_no_scan_op(scan):
    """inductor splits a cumsum over few rows into a split-scan kernel, which crashed on torch 2.11
    (get_block_shape TypeError); the chunked references' prefix sums are matmuls, forward and backward."""
    x, dt = torch.randn(1, 20, 2, 4, requires_grad=True), torch.rand(1, 20, 2)
    A, B, C = -torch.rand(2), torch.randn(1, 20, 1, 8), torch.randn(1, 20, 1, 8)
    graph = make_fx(lambda *inputs: torch.autograd.grad(scan(*inputs), inputs[0]))(x, dt, A, B, C)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "cumsum" in t or "scan" in t], sorted(targets)


def test_gradient_checkpointing_by_kind_recomputes_only_those_layers(build):
    model = _model(build, "bamba")  # layers 0-2 Mamba-2 + MLP, layer 3 attention + MLP
    model.train()
    tokens = torch.randint(0, model.lm_head.weight.size(0), (2, 13))
    _, expected = _loss_and_grads(model, model, tokens)

    model.gradient_checkpointing_enable(kinds=("mamba2",))
    assert [layer.gradient_checkpointing for layer in model.layers] == [True, True, True, False]
    runs = []
    for i, layer in enumerate(model.layers):  # (forward hooks do not fire when checkpoint recomputes)
        layer.forward = lambda *args, i=i, forward=layer.forward: runs.append(i) or forward(*args)
    _, grads = _loss_and_grads(model, model, tokens)
    assert sorted(runs) == [0, 0, 1, 1, 2, 2, 3]  # the checkpointed layers ran again in the backward
    for key, grad in grads.items():
        assert_close(grad, expected[key], what=f"gradient of {key}")

    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.layers) and not model.gradient_checkpointing
    with pytest.raises(ValueError, match="no layer of this model has a component of kind mamba\\b.*choose among attention"):
        model.gradient_checkpointing_enable(kinds=("mamba",))


@pytest.mark.parametrize("name", ["bamba", "hymba_plus"])
def test_generate_compiles_the_decode_step_once_and_decodes_the_same_tokens(build, name, monkeypatch):
    """generate(compile=True): one graph (fullgraph) for every step of two prompts (the position is a tensor, so no
    step recompiles), and the greedy tokens of the eager step. Dynamo's CompileCounter as the backend counts the
    graphs and runs them as traced (inductor's code generation is what the GPU run times, bench/decode.py)."""
    model = _model(build, name).eval()
    graphs = CompileCounter()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **options, backend=graphs))
    torch._dynamo.reset()
    vocab = model.lm_head.weight.size(0)
    for seed in (1, 2):
        prompt = torch.randint(0, vocab, (1, 5), generator=torch.Generator().manual_seed(seed))
        expected = model.generate(prompt, max_new_tokens=6)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, compile=True), expected)
    assert graphs.frame_count == 1, f"{graphs.frame_count} graphs for 10 decode steps of one shape"
