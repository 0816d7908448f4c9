"""templates/runtime/medusa.py: the draft acceptance rule and the cache snapshot that undoes a verify forward.

What matters: a guess counts only if every earlier guess was right (checked against a loop written here), the
model's own token always counts, and restoring a snapshot brings back every recurrent state and the cache length,
whether a layer updated its state in place or replaced it, while position-indexed caches are left uncopied.
"""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from templates.runtime import medusa


def loop_accepted_length(draft: list[int], verified: list[int]) -> int:
    accepted = 1  # d_0 is the model's own greedy token
    for k in range(1, len(draft)):
        if draft[k] != verified[k - 1]:
            break
        accepted += 1
    return accepted


@pytest.mark.parametrize(
    "draft, verified, expected",
    [
        pytest.param([5, 6, 7, 8], [6, 7, 8, 9], 4, id="all-guesses-right"),
        pytest.param([5, 6, 7, 8], [1, 7, 8, 9], 1, id="first-guess-wrong"),
        pytest.param([5, 6, 7, 8], [6, 1, 0, 0], 2, id="second-guess-wrong"),
        pytest.param([5, 6, 7, 8], [6, 1, 8, 9], 2, id="right-after-a-wrong-one-does-not-count"),
        pytest.param([5, 6], [6, 0], 2, id="draft-of-two"),
        pytest.param([5], [3], 1, id="no-guesses"),
    ],
)
def test_accepted_length(draft, verified, expected):
    assert medusa.accepted_length(torch.tensor(draft), torch.tensor(verified)) == expected


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=9))
def test_accepted_length_matches_a_loop(pairs):
    draft, verified = [d for d, _ in pairs], [v for _, v in pairs]
    assert medusa.accepted_length(torch.tensor(draft), torch.tensor(verified)) == loop_accepted_length(draft, verified)


def test_accepted_length_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        medusa.accepted_length(torch.tensor([1, 2, 3]), torch.tensor([1, 2]))


# -----------------------------------------------------------------------------
# Snapshots: a cache shaped like a generated model's (layers of KV caches, dicts of parallel branches, recurrent
# dataclasses), with stand-in classes so that this file needs no other runtime file.


@dataclass
class KV:  # position-indexed: rewound by the cache length
    k: torch.Tensor


@dataclass
class Recurrent:
    conv_state: torch.Tensor
    ssm_state: torch.Tensor


@dataclass
class Cache:
    layers: list
    length: int = 0
    memory: object = None


def make_cache() -> Cache:
    return Cache(
        layers=[
            KV(torch.zeros(1, 8)),
            {"attn": KV(torch.zeros(1, 8)), "ssm": Recurrent(torch.ones(1, 3), torch.ones(1, 4))},
        ],
        length=5,
        memory=(torch.full((2,), 7.0), torch.full((3,), 9.0)),
    )


def test_restore_undoes_in_place_updates_replacements_and_the_length():
    cache = make_cache()
    snapshot = medusa.snapshot_states(cache, rewindable=(KV,))
    ssm = cache.layers[1]["ssm"]
    ssm.conv_state.mul_(3)  # updated in place, as the Mamba layers do
    ssm.ssm_state = torch.zeros(1, 4)  # replaced
    cache.memory = (torch.zeros(2), torch.zeros(3))  # a test-time memory hands back a new state
    cache.length = 9
    snapshot.restore()
    assert snapshot.recurrent
    assert cache.length == 5
    assert torch.equal(cache.layers[1]["ssm"].conv_state, torch.ones(1, 3))
    assert torch.equal(cache.layers[1]["ssm"].ssm_state, torch.ones(1, 4))
    assert torch.equal(cache.memory[0], torch.full((2,), 7.0)) and torch.equal(cache.memory[1], torch.full((3,), 9.0))


def test_position_indexed_caches_are_kept_not_copied():
    cache = make_cache()
    kv = cache.layers[0]
    buffer = kv.k
    snapshot = medusa.snapshot_states(cache, rewindable=(KV,))
    kv.k[0, 6] = 1.0  # a draft token written past the accepted length
    snapshot.restore()
    assert cache.layers[0] is kv and kv.k is buffer, "the KV buffer must stay the same tensor (no copy, stable address)"
    assert kv.k[0, 6] == 1.0, "rewinding a KV cache is the length's job; its slots are overwritten later"
    assert all(value is not buffer for _, _, value in snapshot.saved if isinstance(value, torch.Tensor))


def test_a_cache_of_attention_only_rewinds_by_length_alone():
    cache = Cache(layers=[KV(torch.zeros(1, 8)), {"attn": KV(torch.zeros(1, 8))}], length=3)
    snapshot = medusa.snapshot_states(cache, rewindable=(KV,))
    assert not snapshot.recurrent
    cache.length = 7
    snapshot.restore()
    assert cache.length == 3


def test_stats_report_the_mean_accepted_length():
    assert medusa.MedusaStats(accepted=[1, 4, 2, 1]).mean_accepted_length == 2.0
    assert medusa.MedusaStats().mean_accepted_length == 0.0
