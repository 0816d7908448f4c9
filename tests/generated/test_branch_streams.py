"""A parallel block's branches side by side (ops/decoding.py, branch_stream): the generated Hymba+ forks its attention
branch onto a side stream and joins it before the combine; with the fork taken (forced here on the CPU, whose streams
are no-ops: on CUDA it is taken only while a graph records) each attention branch runs on the side stream and the
Mamba branch on the current one, and decoding gives bit for bit the tokens' logits of the serial order."""

import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_hymba_plus_forks_each_attention_branch_and_joins_it_before_the_combine():
    source = (ROOT / "generated/hymba_plus/model.py").read_text()
    assert "branch_stream" in re.search(r"from \.ops\.decoding import (\([^)]*\)|.*)", source).group(1)
    for attention in ("attn", "global_attn"):
        forward = re.search(rf"class {''.join(p.title() for p in attention.split('_'))}SsmParallel\(nn\.Module\):.*?"
                            r"def forward\(.*?\n(.*?)\n        return y", source, re.S).group(1)
        fork = forward.index(f"with branch_stream(x, 0) as join_{attention}:")
        branch = forward.index(f"{attention}_out = self.{attention}(")
        ssm = forward.index("ssm_out = self.ssm(")
        join = forward.index(f"join_{attention}()")
        combine = forward.index("normalized_mean(")
        assert fork < branch < ssm < join < combine
        assert re.search(rf"\n            +{attention}_out = ", forward), "the attention branch is inside the with"
        assert re.search(r"\n        ssm_out = ", forward), "the Mamba branch stays on the current stream"


@pytest.mark.parametrize("spec", ["hymba_plus", "hspmn"])
def test_decoding_with_the_branches_forked_equals_the_serial_order_bit_for_bit(build, monkeypatch, spec):
    package = build(ROOT / f"specs/{spec}.yaml")
    decoding = importlib.import_module(f"{package.__name__}.ops.decoding")
    torch.manual_seed(0)
    model = package.Model().eval()
    prompt, tokens = torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 4))

    def decode():
        cache = model.empty_cache(2, 64)
        logits = [model(prompt, cache=cache).logits]
        logits += [model(tokens[:, i : i + 1], cache=cache).logits for i in range(tokens.size(1))]
        return logits

    with torch.no_grad():
        serial = decode()
        parallels = [m for m in model.modules() if type(m).__name__.endswith("Parallel")]
        ran_on = {"first": [], "last": []}
        for mixer in parallels:
            children = list(mixer.children())
            first, last = children[0], next(c for c in reversed(children) if hasattr(c, "empty_cache"))
            first.register_forward_pre_hook(lambda *_: ran_on["first"].append(torch.cpu.current_stream()))
            last.register_forward_pre_hook(lambda *_: ran_on["last"].append(torch.cpu.current_stream()))
        forks = []
        forked = decoding._forked
        monkeypatch.setattr(decoding, "forks_branches", lambda x: True)
        monkeypatch.setattr(decoding, "_forked", lambda *a: forks.append(a) or forked(*a))
        concurrent = decode()
    origin = torch.cpu.current_stream()
    assert parallels and len(forks) == (1 + tokens.size(1)) * len(parallels), "one fork per parallel layer and forward"
    assert len(ran_on["first"]) == len(ran_on["last"]) == len(forks)
    assert all(stream is not origin for stream in ran_on["first"]), "the first branch runs on a side stream"
    assert all(stream is origin for stream in ran_on["last"]), "the last branch runs on the current stream"
    for got, want in zip(concurrent, serial, strict=True):
        assert torch.equal(got, want)


def test_the_generated_hymba_plus_decoding_step_records_each_branch_on_a_side_stream_of_its_own():
    """A decoding step whose projections combine (decoding_step) forks both branches, attention onto side stream 0 and
    Mamba onto side stream 1, and joins both before it returns (with Mamba on the recording stream the step ran 0.7-1.1%
    slower on the H200: docs/design.md, "Both branches on side streams"). It records Mamba first, the branch with
    more weights (emit/plan.py heaviest_first): a replay starts the branches in their recording order."""
    source = (ROOT / "generated/hymba_plus/model.py").read_text()
    for attention in ("attn", "global_attn"):
        step = re.search(rf"class {''.join(p.title() for p in attention.split('_'))}SsmParallel\(nn\.Module\):.*?"
                         r"def decoding_step\(.*?\n(.*?)\n        return combine\.h, combine\.s", source, re.S).group(1)
        order = [step.index(text) for text in ("with branch_stream(x, 1) as join_ssm:", "ssm_in = self.ssm(",
                                               "combine.project(1, ssm_in, self.ssm.out_proj)",
                                               f"with branch_stream(x, 0) as join_{attention}:",
                                               f"{attention}_in = self.{attention}(",
                                               f"join_{attention}()", "join_ssm()")]
        assert order == sorted(order), step


def test_a_decoding_step_with_both_branches_forked_decodes_bit_for_bit_as_the_serial_order(tmp_path, monkeypatch):
    """With the forks taken (forced on the CPU) and the combining projections run (Triton's interpreter), each
    decoding step records the attention branch on side stream 0 and the Mamba branch on side stream 1, neither on the
    current stream, and the logits are the serial order's, bit for bit."""
    from tests.conftest import build_spied_package, decode_in_steps

    spied = ("combine_projections_module.combining_linear_", "linear")
    package = build_spied_package(ROOT / "specs/hymba_plus.yaml", tmp_path, monkeypatch, spied, preset="tiny")
    forced = {package.kernels.combining_linear_, package.kernels.linear}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: kernel in forced)
    decoding = importlib.import_module(f"{package.__name__}.ops.decoding")
    torch.manual_seed(0)
    model = package.Model().eval()
    tokens = torch.randint(0, 256, (1, 7))
    serial = decode_in_steps(model, tokens, prefill=5, max_len=4 + 7)
    ran_on = {"attn": [], "ssm": []}
    for mixer in (m for m in model.modules() if type(m).__name__.endswith("Parallel")):
        attention = mixer.attn if hasattr(mixer, "attn") else mixer.global_attn
        attention.register_forward_pre_hook(lambda *_: ran_on["attn"].append(torch.cpu.current_stream()))
        mixer.ssm.register_forward_pre_hook(lambda *_: ran_on["ssm"].append(torch.cpu.current_stream()))
    monkeypatch.setattr(decoding, "forks_branches", lambda x: True)
    concurrent = decode_in_steps(model, tokens, prefill=5, max_len=4 + 7)
    steps = 4 * 2  # 4 parallel layers, 2 decoding steps (the prefill's rows take forward, not decoding_step)
    first, second = decoding._SIDE_STREAMS[("cpu", 0)], decoding._SIDE_STREAMS[("cpu", 1)]
    assert first is not second and torch.cpu.current_stream() not in (first, second)
    assert ran_on["attn"][-steps:] == [first] * steps and ran_on["ssm"][-steps:] == [second] * steps
    assert torch.equal(concurrent, serial)
