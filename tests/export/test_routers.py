"""The two data-dependent routers export as fixed-shape computations: the MoE dispatch into fixed-capacity expert
buffers (dropless, and with a capacity factor that drops), and HSPMN's per-token selection as a mask. One graph,
traced at one token count, serves other counts in torch.export and onnxruntime alike, with no control flow in it."""

from __future__ import annotations

import pytest
import torch

from archgen.export.onnx_export import onnx_session
from templates.runtime import moe, routing
from tests.numerics import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch.onnx's own deprecated internals


class MoE(torch.nn.Module):
    def __init__(self, capacity_factor):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w_in = torch.nn.Parameter(torch.randn(4, 8, 2 * 12, generator=generator) / 8**0.5)  # 4 experts, [gate | up]
        self.w_out = torch.nn.Parameter(torch.randn(4, 12, 8, generator=generator) / 12**0.5)
        self.capacity_factor = capacity_factor

    def forward(self, x, router_logits):
        y, stats = moe.moe_forward(x, router_logits, self.w_in, self.w_out, top_k=2, capacity_factor=self.capacity_factor)
        return y, stats["dropped"]


class ContextualStream(torch.nn.Module):
    """HSPMN inference: select tokens by their router logit, attend for the selected ones, gate."""

    def forward(self, router_logits, q, k, v):
        gate, selected = routing.select_tokens(router_logits, training=False)
        positions = torch.arange(q.size(2))
        out = routing.sparse_query_attention(q, k, v, selected, q_positions=positions, k_positions=positions)
        return out * gate[:, None, :, None]


def export_both(module, args, dynamic_shapes, path):
    program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=18, verbose=False)
    onnx_program.save(str(path))
    ops = {node.op_type for node in onnx_program.model_proto.graph.node}
    assert not ops & {"If", "Loop", "Scan"}, f"control flow in the exported router: {sorted(ops & {'If', 'Loop', 'Scan'})}"
    return program.module(), onnx_session(path)


def run_session(session, *args):
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def moe_inputs(n_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, 8, generator=generator), 2 * torch.randn(n_tokens, 4, generator=generator)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity1.0"])
def test_moe_router_exports_as_fixed_capacity_dispatch(capacity_factor, tmp_path):
    model = MoE(capacity_factor).eval()
    n_tokens = torch.export.Dim("n_tokens", min=8, max=4096)
    exported, session = export_both(model, moe_inputs(20, 0), ({0: n_tokens}, {0: n_tokens}), tmp_path / "moe.onnx")
    dropped_somewhere = False
    for n in (9, 57):
        args = moe_inputs(n, n)
        with torch.no_grad():
            y, dropped = model(*args)
            for label, (y_got, dropped_got) in (("pt2", exported(*args)), ("onnx", run_session(session, *args))):
                assert_close(y_got, y, what=f"{label}, {n} tokens")
                assert int(dropped_got) == int(dropped), f"{label}, {n} tokens: dropped assignments differ"
        dropped_somewhere |= int(dropped) > 0
    assert dropped_somewhere == (capacity_factor is not None), "the capacity case must actually drop assignments"


def test_hspmn_router_exports_as_a_mask(tmp_path):
    def inputs(length, seed):
        generator = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, 4, length, 8, generator=generator) for _ in range(3))
        return torch.randn(2, length, generator=generator), q, k, v

    T = torch.export.Dim("T", min=2, max=512)
    exported, session = export_both(ContextualStream(), inputs(16, 0), ({1: T}, {2: T}, {2: T}, {2: T}),
                                    tmp_path / "router.onnx")
    for length in (3, 41):
        args = inputs(length, length)
        expected = ContextualStream()(*args)
        assert (expected == 0).all(dim=-1).any() and (expected != 0).any(), "some tokens selected, some not"
        for label, got in (("pt2", exported(*args)), ("onnx", run_session(session, *args)[0])):
            assert_close(got, expected, what=f"{label}, T={length}")
