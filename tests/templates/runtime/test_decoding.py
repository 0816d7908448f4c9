"""templates/runtime/decoding.py: the step a CUDA graph records, run eagerly on the CPU, decodes exactly like the
model's own cached decoding, for every spec (the graph itself is checked on a GPU by bench/decode.py)."""

import pytest
import torch

from templates.runtime import decoding
from tests.conftest import SPECS
from tests.numerics import assert_close


class EagerDecoder(decoding.CUDAGraphDecoder):
    """The recorded step without the recording: what each replay of the graph computes."""

    def capture(self):
        self.reset(int(self.cache.length))

    def __call__(self, token):
        self.token.copy_(token)
        return self._step()


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_recorded_step_decodes_like_the_model(spec_path, build):
    package = build(spec_path)
    torch.manual_seed(0)
    model = package.Model().eval()
    kwargs = {"update_memory": True} if hasattr(model, "memory") else {}
    prompt = torch.randint(0, 256, (2, 9))
    tokens = torch.randint(0, 256, (2, 6))
    max_len = 64

    with torch.no_grad():
        expected_cache = model.empty_cache(2, max_len)
        model(prompt, cache=expected_cache, **kwargs)
        expected = [model(tokens[:, i : i + 1], cache=expected_cache, **kwargs).logits[:, -1] for i in range(tokens.size(1))]

        cache = model.empty_cache(2, max_len)
        model(prompt, cache=cache, **kwargs)
        decoder = EagerDecoder(lambda token, c: model(token, cache=c, **kwargs).logits[:, -1], cache, 2, prompt.device)
        actual = [decoder(tokens[:, i : i + 1]).clone() for i in range(tokens.size(1))]

    assert int(decoder.position) == int(expected_cache.length)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, what=f"step {step}")


def test_state_a_layer_rebinds_is_copied_back_where_the_step_reads_it():
    from dataclasses import dataclass

    @dataclass
    class Cache:
        layers: list
        length: object = 0

    state = torch.zeros(3)

    def step(token, cache):
        cache.layers = [cache.layers[0] + token.float().view(-1)]  # returns new state instead of writing in place
        return cache.layers[0].clone().view(1, -1)

    cache = Cache([state])
    decoder = EagerDecoder(step, cache, 1, torch.device("cpu"))
    decoder(torch.tensor([[2]]))
    out = decoder(torch.tensor([[3]]))
    assert cache.layers[0] is state, "the cache must keep the tensors the graph reads"
    assert torch.equal(state, torch.full((3,), 5.0)) and torch.equal(out, torch.full((1, 3), 5.0))
    assert int(decoder.position) == 2
