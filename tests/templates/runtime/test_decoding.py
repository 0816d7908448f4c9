"""templates/runtime/decoding.py: the step a CUDA graph records, run eagerly on the CPU, decodes exactly like the
model's own cached decoding, for every spec, also when a second prompt reuses the first one's cache (the graph itself
is checked on a GPU by bench/decode.py)."""

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from templates.runtime import decoding
from tests.conftest import SPECS


class EagerDecoder(decoding.CUDAGraphDecoder):
    """The recorded step without the recording: what each replay of the graph computes."""

    def capture(self):
        self.graph = SimpleNamespace(replay=self._step)  # a replay computes what the recorded step computes

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


@pytest.mark.parametrize("spec", ["hymba_plus", "hspmn"])
def test_greedy_replays_feed_each_step_its_own_argmax_and_give_the_models_greedy_tokens(spec, build):
    package = build(Path(__file__).resolve().parents[3] / f"specs/{spec}.yaml")
    torch.manual_seed(0)
    model = package.Model().eval()
    prompt, steps, max_len = torch.randint(0, 256, (2, 9)), 5, 64
    with torch.no_grad():
        cache = model.empty_cache(2, max_len)
        logits = model(prompt, cache=cache).logits[:, -1]
        expected = []
        for _ in range(steps + 1):
            expected.append(logits.argmax(dim=-1, keepdim=True))
            logits = model(expected[-1], cache=cache).logits[:, -1]

        decoder = EagerDecoder(lambda token, cache: model(token, cache=cache).logits[:, -1],
                               lambda: model.empty_cache(2, max_len), 2, prompt.device, max_len)
        first = decoder.prefill(lambda cache: model(prompt, cache=cache).logits[:, -1]).argmax(dim=-1, keepdim=True)
        picks = decoder.greedy(first, steps)
    assert torch.equal(first, expected[0]) and torch.equal(picks, torch.cat(expected[1:], dim=1))
    with pytest.raises(ValueError, match="pass the cache's 64: make the decoder with a larger max_len"):
        decoder.greedy(first, max_len)


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


def test_new_token_count_follows_transformers():
    assert decoding.new_token_count(5, 8, None) == 8
    assert decoding.new_token_count(5, 8, 100) == 8, "max_new_tokens wins over max_length"
    assert decoding.new_token_count(5, None, 12) == 7, "max_length counts the prompt"
    assert decoding.new_token_count(5, None, None) == decoding.DEFAULT_MAX_LENGTH - 5
    with pytest.raises(ValueError, match="pass max_new_tokens"):
        decoding.new_token_count(12, None, 12)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 4.0, 1.0]])
    penalized = decoding.penalize_repeats(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert torch.equal(penalized, torch.tensor([[1.0, -4.0, 4.0, 1.0]]))
    assert decoding.penalize_repeats(logits, torch.tensor([[0]]), 1.0) is logits
    with pytest.raises(ValueError, match="positive"):
        decoding.penalize_repeats(logits, torch.tensor([[0]]), 0.0)


def test_end_of_sequence_stops_rows_one_by_one_and_pads_after():
    end = decoding.EndOfSequence([7, 9], pad_token_id=0, batch=3, device=torch.device("cpu"))
    assert torch.equal(end(torch.tensor([[7], [1], [2]])), torch.tensor([[7], [1], [2]]))
    assert not end.all_finished()
    assert torch.equal(end(torch.tensor([[5], [9], [3]])), torch.tensor([[0], [9], [3]])), "row 0 ended: padded"
    assert torch.equal(end(torch.tensor([[5], [5], [7]])), torch.tensor([[0], [0], [7]]))
    assert end.all_finished()
    never = decoding.EndOfSequence(None, None, 2, torch.device("cpu"))
    assert torch.equal(never(torch.tensor([[7], [9]])), torch.tensor([[7], [9]])) and not never.all_finished()
    assert decoding.EndOfSequence(4, None, 1, torch.device("cpu")).pad == 4, "pad defaults to the first eos id"


def test_streamer_is_an_object_with_put_and_end_or_a_callback():
    class Streamer:
        def put(self, tokens):
            pass

        def end(self):
            pass

    streamer = Streamer()
    assert decoding.as_streamer(streamer) is streamer and decoding.as_streamer(None) is None
    seen = []
    wrapped = decoding.as_streamer(seen.append)
    wrapped.put(torch.tensor([3]))
    wrapped.end()
    assert seen == [torch.tensor([3])]
    with pytest.raises(TypeError, match="put"):
        decoding.as_streamer(42)


def test_sample_is_greedy_at_temperature_zero_and_keeps_top_k():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    assert torch.equal(decoding.sample(logits, 0, None, None), torch.tensor([[1], [0]]))
    drawn = torch.cat([decoding.sample(logits, 1.0, 2, None, torch.Generator().manual_seed(i)) for i in range(30)], dim=1)
    assert set(drawn[0].tolist()) <= {1, 2} and set(drawn[1].tolist()) <= {0, 2}


class _Tensor:  # what forks_branches reads of a tensor: a CUDA one without a GPU
    is_cuda = True


@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("capturing", [False, True])
@pytest.mark.parametrize("flag", [False, True])
def test_branches_fork_only_while_a_graph_records_without_autograd_and_the_flag_is_on(monkeypatch, flag, capturing,
                                                                                      grad, compiling):
    monkeypatch.setattr(decoding, "CONCURRENT_BRANCHES", flag)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with torch.set_grad_enabled(grad):
        assert decoding.forks_branches(_Tensor()) == (flag and capturing and not grad and not compiling)
    assert not decoding.forks_branches(torch.zeros(1)), "a CPU tensor: no graph is recorded"


def test_branch_stream_is_a_no_op_unless_it_forks(monkeypatch):
    monkeypatch.setattr(decoding, "forks_branches", lambda x: False)
    origin = torch.cpu.current_stream()
    with decoding.branch_stream(torch.zeros(1), 0) as join:
        assert torch.cpu.current_stream() is origin
    assert join() is None and torch.cpu.current_stream() is origin


def test_branch_stream_forks_onto_a_side_stream_of_its_own_and_joins_back(monkeypatch):
    """The side stream waits for the current one before the branch, the branch runs on it, and join makes the
    current stream wait for the side one; a side stream that is the current stream (CUDA's pool of 32 streams handed
    out in turn) is replaced, since forking onto it would run the branches one after another."""
    waits = []
    monkeypatch.setattr(torch.cpu.Stream, "wait_stream", lambda self, other: waits.append((self, other)))
    monkeypatch.setattr(decoding, "forks_branches", lambda x: True)
    origin = torch.cpu.current_stream()
    monkeypatch.setitem(decoding._SIDE_STREAMS, ("cpu", 0), origin)
    monkeypatch.delitem(decoding._SIDE_STREAMS, ("cpu", 1), raising=False)
    x = torch.zeros(1)
    with decoding.branch_stream(x, 0) as join_first:
        first = torch.cpu.current_stream()
    with decoding.branch_stream(x, 1) as join_second:
        second = torch.cpu.current_stream()
    assert first is not origin and second is not origin and first is not second
    assert waits == [(first, origin), (second, origin)]
    assert torch.cpu.current_stream() is origin
    join_first()
    join_second()
    assert waits[2:] == [(origin, first), (origin, second)]
    with decoding.branch_stream(x, 0):
        assert torch.cpu.current_stream() is first, "one side stream per branch and device, made once"
