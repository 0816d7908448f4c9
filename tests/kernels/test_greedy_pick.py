"""kernels/greedy_pick.py: each row's argmax written as the next token and into the row of picks at the step's
position (clamped to the last column), against the torch ops it replaces, on fresh random logits of odd widths (one
tile, several, a partial last one), float32 and bfloat16, with ties (the first column wins, as torch.argmax), rows of
-inf, and a NaN. Runs in Triton's interpreter without CUDA."""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import greedy_pick as kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def buffers(batch: int, length: int, position: int):
    token = torch.full((batch, 1), -1, dtype=torch.long, device=DEVICE)
    picks = torch.full((batch, length), -1, dtype=torch.long, device=DEVICE)
    return token, picks, torch.tensor(position, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [37, kernel.BLOCK_V, 2 * kernel.BLOCK_V + 1001, 40 * kernel.BLOCK_V - 3])
@pytest.mark.parametrize("position", [3, 50])  # inside the picks row, and past it (clamped to the last column)
def test_the_pick_is_torchs_argmax_in_the_token_and_the_picks_row(dtype, vocab, position, monkeypatch):
    launches = []
    launcher = kernel.greedy_pick_forward
    monkeypatch.setattr(kernel, "greedy_pick_forward", lambda *args: launches.append(1) or launcher(*args))
    g = torch.Generator().manual_seed(vocab + position)
    logits = torch.randn(3, vocab, generator=g).to(dtype).to(DEVICE)
    logits[1, vocab // 3] = logits[1, vocab - 1] = logits[1].max() + 1  # a tie: the first column wins
    logits[2] = float("-inf")  # nothing but -inf: column 0, as torch
    expected = buffers(3, 10, position)
    kernel.greedy_pick_reference(logits, *expected)
    got = buffers(3, 10, position)
    kernel.greedy_pick_(logits, *got)
    assert launches and torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (got, expected)
    assert got[0][1, 0] == vocab // 3 and got[0][2, 0] == 0
    splits, _ = kernel.split_columns(vocab)
    if splits > 1:  # the rows' counters are zero again for the next launch
        assert not kernel._scratch(logits.device, 3, splits)[2].any()


@pytest.mark.parametrize("vocab", [300, 3 * kernel.BLOCK_V])  # one program a row, and three
def test_a_nan_is_picked_as_torch_picks_it(vocab):
    logits = torch.randn(2, vocab, device=DEVICE)
    logits[0, vocab - 123] = float("nan")  # in the last split
    token, picks, position = buffers(2, 4, 1)
    kernel.greedy_pick_(logits, token, picks, position)
    assert token[0, 0] == vocab - 123 == logits.argmax(dim=-1)[0]
    assert token[1, 0] == logits.argmax(dim=-1)[1]


def test_buffers_of_the_wrong_shape_or_dtype_are_refused_with_what_to_pass():
    logits = torch.randn(2, 30, device=DEVICE)
    token, picks, position = buffers(2, 4, 1)
    with pytest.raises(ValueError, match=r"token must be \(2, 1\) int64"):
        kernel.greedy_pick_(logits, token.int(), picks, position)
    with pytest.raises(ValueError, match="0-dim int64"):
        kernel.greedy_pick_(logits, token, picks, position.view(1))


def test_the_op_passes_torch_librarys_checks():
    logits = torch.randn(2, 30, device=DEVICE)
    torch.library.opcheck(kernel.greedy_pick_op, (logits, *buffers(2, 4, 1)), test_utils=("test_schema", "test_faketensor"))
