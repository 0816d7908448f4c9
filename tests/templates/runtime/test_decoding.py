"""templates/runtime/decoding.py: the step a CUDA graph records, run eagerly on the CPU, decodes exactly like the
model's own cached decoding, for every spec, also when a second prompt reuses the first one's cache (the graph itself
is checked on a GPU by bench/decode.py)."""

from dataclasses import dataclass

import pytest
import torch

from templates.runtime import decoding
from tests.conftest import SPECS


class EagerDecoder(decoding.CUDAGraphDecoder):
    """The recorded step without the recording: what each replay of the graph computes."""

    def capture(self):
        pass

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

        decoder = EagerDecoder(lambda token, cache: model(token, cache=cache, **kwargs).logits[:, -1],
                               lambda: model.empty_cache(2, max_len), 2, prompt.device)
        runs = []
        for _ in range(2):  # the second prompt reuses the first one's cache, as a replayed graph does
            decoder.prefill(lambda cache: model(prompt, cache=cache, **kwargs).logits[:, -1])
            runs.append([decoder(tokens[:, i : i + 1]).clone() for i in range(tokens.size(1))])

    assert int(decoder.position) == int(expected_cache.length)
    for actual in runs:
        for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
            err = ((a - e).abs().max() / e.abs().max()).item()
            assert err < 1e-5, f"step {step}: relative error {err:.2e}"


def test_state_a_layer_rebinds_is_copied_back_where_the_step_reads_it():
    @dataclass
    class Cache:
        layers: list
        length: object = 0

    def step(token, cache):
        cache.layers = [cache.layers[0] + token.float().view(-1)]  # returns new state instead of writing in place
        return cache.layers[0].clone().view(1, -1)

    decoder = EagerDecoder(step, lambda: Cache([torch.zeros(3)]), 1, torch.device("cpu"))
    decoder.prefill(lambda cache: cache.layers[0].view(1, -1))
    state = decoder.cache.layers[0]
    decoder(torch.tensor([[2]]))
    out = decoder(torch.tensor([[3]]))
    assert decoder.cache.layers[0] is state, "the cache must keep the tensors the graph reads"
    assert torch.equal(state, torch.full((3,), 5.0)) and torch.equal(out, torch.full((1, 3), 5.0))
    assert int(decoder.position) == 2
