"""
Fast decoding: one decode step captured in a CUDA graph and replayed for every generated token.

This file is copied verbatim into generated packages as `ops/decoding.py` and imports only torch.

A batch-1 decode step of a model of a billion parameters is a few hundred small kernels. Launched one by one from
Python, the GPU waits on the launches most of the time (measured for Bamba-1B on an H200: 2.2 ms of GPU work in a
17 ms step). Every cache of a generated model is preallocated and written in place at a position that may be a
0-dim tensor, so one step can be recorded once as a CUDA graph and replayed: a replay launches the whole step at once
and the Python code never runs again.

What a captured step reads and writes must live at fixed addresses:
- the new token is copied into a static (B, 1) buffer before each replay;
- the position is a device scalar that the step itself advances (`cache.length` is that scalar while decoding);
- decoding state that a layer writes in place (KV caches, SSM and conv states) is already static; state a layer
  returns as new tensors (the Titans memory rebinds `cache.memory`) is copied back into the tensors the step read,
  inside the graph, so the next replay reads the new values;
- the logits are the graph's own output buffer: read (or copy) them before the next replay.

Sampling stays outside the graph (it runs on one (B, V) row of logits, a handful of kernels), so every sampling
option of `generate` works unchanged. The graph also takes each step's argmax and feeds it to the next step, so plain
greedy decoding (no stop tokens, penalty or streamer) is the graph replayed back to back (`greedy`); a sampled token
copied in before a replay overrides the argmax.

Inside the graph the branches of a parallel block (attention ∥ Mamba, both reading the same input) run side by side:
`branch_stream` records each branch but the last on a side stream of its own, forked from the recording stream and
joined back before the combine, so one branch's small kernels fill the other's ramp-ups, tails and gaps
(CONCURRENT_BRANCHES = False records them one after another).

The rest of this file is what `generate` does between two steps, with Hugging Face's names and meanings:
    new_token_count     max_new_tokens / max_length → how many tokens to add
    penalize_repeats    repetition_penalty (CTRL's rule) on the tokens a row already holds
    sample              greedy, or temperature → top-k → top-p sampling
    EndOfSequence       per-row stopping at eos_token_id, pad_token_id after it
    as_streamer         a streamer (put/end, as transformers' TextStreamer) or a plain callback
"""

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Steps run before capture: the first calls of a process compile Triton kernels, pick cuBLAS algorithms and grow the
# allocator's pools, none of which may happen while a graph records.
WARMUP_STEPS = 2


def state_tensors(state) -> list[Tensor]:
    """Every tensor of a decoding state (dataclasses, dicts, lists), in a fixed order; a Cache's `length` (the
    position, which the decoder keeps itself) is not part of it."""
    if isinstance(state, Tensor):
        return [state]
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return [t for f in dataclasses.fields(state) if f.name != "length" for t in state_tensors(getattr(state, f.name))]
    if isinstance(state, dict):
        return [t for value in state.values() for t in state_tensors(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in state_tensors(value)]
    return []


def copy_structure(state):
    """A copy of the containers of `state` that shares its tensors: rebinding a field of the original (a layer that
    returns a new state object) leaves the copy pointing at the tensors the step started from."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **{f.name: copy_structure(getattr(state, f.name)) for f in dataclasses.fields(state) if f.init})
    if isinstance(state, dict):
        return {key: copy_structure(value) for key, value in state.items()}
    if isinstance(state, list):
        return [copy_structure(value) for value in state]
    if isinstance(state, tuple):
        return tuple(copy_structure(value) for value in state)
    return state


def greedy_pick_(logits: Tensor, token: Tensor, picks: Tensor, position: Tensor) -> None:
    """Each row's argmax of logits (B, V) into token (B, 1), the next step's input, and into picks (B, L) at column
    min(position, L - 1): a captured step's greedy choice (kernels/greedy_pick.py: the same in one launch)."""
    pick = logits.argmax(dim=-1, keepdim=True)
    token.copy_(pick)
    picks.index_copy_(1, position.clamp(max=picks.size(1) - 1).view(1), pick)


class CUDAGraphDecoder:
    """
    Decoding for a fixed batch size, cache length and device, with the one-token step replayed from a CUDA graph.

        decoder = CUDAGraphDecoder(step, empty_cache, batch, device)
        logits = decoder.prefill(lambda cache: model(prompt, cache=cache).logits[:, -1])   # (B, V)
        logits = decoder(next_token)                                                         # each new token (B, 1)

    `step(token, cache) -> logits (B, V)` is the model's decode step; `empty_cache()` makes a fresh cache. The first
    prefill records the graph; later prefills (a new prompt of the same batch size) copy their state into the cache
    the graph reads and replay the same graph. The step must not synchronise with the host (no .item(), no
    data-dependent shapes); generated models keep their decode step free of both, which also lets torch.export
    trace it.
    """

    def __init__(self, step: Callable[[Tensor, object], Tensor], empty_cache: Callable[[], object], batch: int,
                 device: torch.device, max_len: int | None = None, pick: Callable[..., None] | None = None):
        """pick(logits, token, picks, position): greedy_pick_'s signature (the package's kernel where it has one)."""
        self.step_fn = step
        self.pick = pick or greedy_pick_
        self.empty_cache = empty_cache
        self.cache = None  # the cache the graph reads and writes, from the first prefill on
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        # Each step's argmax, by the position it is for (up to the cache's max_len), and fed back as the next token:
        # greedy decoding then replays the graph back to back with nothing of the host's in between (`greedy`).
        self.picks = None if max_len is None else torch.zeros(batch, max_len + 1, dtype=torch.long, device=device)
        self.prefilled_length = 0

    def prefill(self, run_prompt: Callable[[object], Tensor]) -> Tensor:
        """Run the prompt into a fresh cache (run_prompt(cache) -> its last logits) and make it the graph's state."""
        cache = self.empty_cache()
        logits = run_prompt(cache)
        length = self.prefilled_length = int(cache.length)
        if self.cache is None:
            self.cache = cache
            self.capture()
        else:
            for target, value in zip(state_tensors(self.cache), state_tensors(cache), strict=True):
                target.copy_(value)
        self.position.fill_(length)
        self.cache.length = self.position
        return logits

    def _step(self) -> Tensor:
        cache = self.cache
        cache.length = self.position
        started_from = copy_structure(cache)
        logits = self.step_fn(self.token, cache)
        for read, written in zip(state_tensors(started_from), state_tensors(cache), strict=True):
            if written is not read:  # the layer returned new tensors: the next step must find them where it reads
                read.copy_(written)
        for f in dataclasses.fields(cache):
            setattr(cache, f.name, getattr(started_from, f.name))
        self.position.add_(1)
        cache.length = self.position
        if self.picks is not None:
            self.pick(logits, self.token, self.picks, self.position)
        return logits

    def capture(self) -> None:
        """Warm up on a side stream, put the decoding state back, then record one step."""
        length = int(self.cache.length)
        saved = [t.clone() for t in state_tensors(self.cache)]
        self.position.fill_(length)
        side = torch.cuda.Stream(self.token.device)
        side.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(self.token.device).wait_stream(side)
        for tensor, value in zip(state_tensors(self.cache), saved, strict=True):
            tensor.copy_(value)
        self.position.fill_(length)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        # Recording ran no kernel, but the Python side advanced the position tensor's bookkeeping: put it back.
        self.position.fill_(length)
        self.cache.length = self.position

    def __call__(self, token: Tensor) -> Tensor:
        """The logits (B, V) after `token` (B, 1); valid until the next call."""
        self.token.copy_(token)
        self.graph.replay()
        return self.logits

    def greedy(self, first: Tensor, steps: int) -> Tensor:
        """The greedy continuation after the prefill and `first` (B, 1), its next token: `steps` replays back to back,
        each feeding the last one's argmax (the host launches only the replays; with the host's argmax and copies
        between them Hymba+ decoded ~0.09 ms a token slower on an H200) → (B, steps)."""
        if self.picks is None:
            raise ValueError("this decoder keeps no greedy picks: make it with max_len (Model.graph_decoder does)")
        if self.prefilled_length + steps >= self.picks.size(1):
            raise ValueError(f"{steps} greedy steps after {self.prefilled_length} positions pass the cache's "
                             f"{self.picks.size(1) - 1}: make the decoder with a larger max_len")
        self.token.copy_(first)
        for _ in range(steps):
            self.graph.replay()
        start = self.prefilled_length + 1  # the first replay's pick is for the position after `first`'s
        return self.picks[:, start : start + steps].clone()


# A parallel block's branches on streams of their own while a CUDA graph records (branch_stream). False records them
# one after another on one stream; a graph keeps what it recorded, so flip it before a capture (bench/decode.py
# --serial-branches flips it for an A/B in one process).
CONCURRENT_BRANCHES = True

_SIDE_STREAMS: dict[tuple[str, int], object] = {}  # (device, branch) -> the stream that branch is recorded on


def forks_branches(x: Tensor) -> bool:
    """
    Whether a parallel block runs its branches on streams of their own now: only while a CUDA graph records a step
    without autograd (graph decoding). Not under torch.compile or torch.export (their graphs hold no streams: the
    compiled step recorded in a graph stays on one stream), not in eager decoding or training (the kernels there are
    launched one by one from Python, which a second stream does not hide), and not when CONCURRENT_BRANCHES is off.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # first: tracing reads no flag or stream
        return False
    return CONCURRENT_BRANCHES and x.is_cuda and not torch.is_grad_enabled() and torch.cuda.is_current_stream_capturing()


def branch_stream(x: Tensor, branch: int):
    """
    The stream branch number `branch` of a parallel block runs on, as a context whose value joins it back:

        with branch_stream(x, 0) as join_attn:
            attn_out = self.attn(x, ...)  # recorded on a side stream
        ssm_out = self.ssm(x, ...)  # on the recording stream, beside it
        join_attn()  # the combine reads both

    Where forks_branches(x) holds, the side stream first waits for everything the current stream has queued (x and
    whatever else the branch reads were made there), the branch is recorded on it, and join() makes the current
    stream wait for the branch before anything after it. Both are event waits that a CUDA graph records as edges:
    a replay runs the same kernels on the same inputs as the serial order, in an order those edges allow. Anywhere
    else a no-op: the branch runs where it is, join() does nothing. Why the allocator is safe with it: docs/design.md,
    "Fast decoding (CUDA graphs)".
    """
    if not forks_branches(x):
        return contextlib.nullcontext(_no_join)
    streams = torch.get_device_module(x.device)  # torch.cuda (torch.cpu's no-op streams in the tests)
    origin = streams.current_stream(x.device)
    return _forked(streams, origin, _side_stream(streams, x.device, branch, origin))


def _no_join() -> None:
    pass


@contextlib.contextmanager
def _forked(streams, origin, side):
    side.wait_stream(origin)  # the branch starts after its inputs
    with streams.stream(side):
        yield lambda: origin.wait_stream(side)


def _side_stream(streams, device: torch.device, branch: int, origin):
    """The side stream of branch `branch` on `device`, made once. CUDA hands out streams from a pool of 32 in turn,
    so a new one may be the very stream the graph records on (a fork onto it would run serially): then another."""
    key = (str(device), branch)
    side = _SIDE_STREAMS.get(key)
    while side is None or side == origin:
        side = _SIDE_STREAMS[key] = streams.Stream(device) if device.type == "cuda" else streams.Stream()
    return side


DEFAULT_MAX_LENGTH = 20  # transformers' default total length when neither max_new_tokens nor max_length is given


def new_token_count(prompt_length: int, max_new_tokens: int | None, max_length: int | None) -> int:
    """How many tokens generate adds: max_new_tokens when given (it wins over max_length, as in transformers), else
    max_length minus the prompt's length (max_length counts the prompt), else up to DEFAULT_MAX_LENGTH in all."""
    if max_new_tokens is not None:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
        return max_new_tokens
    total = DEFAULT_MAX_LENGTH if max_length is None else max_length
    if total <= prompt_length:
        given = f"max_length={max_length}" if max_length is not None else f"the default max_length ({DEFAULT_MAX_LENGTH})"
        raise ValueError(f"the prompt already has {prompt_length} tokens, {given} leaves no room for new ones: "
                         "pass max_new_tokens (the number of tokens to add) or a larger max_length")
    return total - prompt_length


def penalize_repeats(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    """Repetition penalty (Keskar et al. 2019, as transformers applies it): for every token id a row already holds
    (prompt included), its logit is divided by `penalty` when positive and multiplied by it when negative, so
    penalty > 1 makes repeats less likely. logits (B, V), tokens (B, T) → (B, V)."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {penalty}")
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, tokens)  # (B, T)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, tokens, seen)


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token from logits (B, V) → (B, 1): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature < 0:
        raise ValueError(f"temperature must be positive (or 0 for greedy decoding), got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


class EndOfSequence:
    """Per-row stopping: a row ends with its first end-of-sequence token; every token chosen for it afterwards is
    replaced by pad_token_id (default: the first eos id), as transformers does. Without eos ids no row ever ends."""

    def __init__(self, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, batch: int,
                 device: torch.device):
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = torch.tensor(ids, dtype=torch.long, device=device)  # (E,)
        self.pad = pad_token_id if pad_token_id is not None else (ids[0] if ids else None)
        self.finished = torch.zeros(batch, 1, dtype=torch.bool, device=device)  # (B, 1)

    def __call__(self, next_token: Tensor) -> Tensor:
        """next_token (B, 1) → the same with finished rows padded; marks the rows that end here."""
        if self.eos.numel() == 0:
            return next_token
        next_token = next_token.masked_fill(self.finished, self.pad)
        self.finished |= torch.isin(next_token, self.eos)
        return next_token

    @property
    def never_ends(self) -> bool:
        """No eos ids: every row runs to the last token."""
        return self.eos.numel() == 0

    def all_finished(self) -> bool:
        """Whether every row has ended (one host synchronisation; only asked when there are eos ids)."""
        return self.eos.numel() > 0 and bool(self.finished.all())


class _CallbackStreamer:
    def __init__(self, callback: Callable[[Tensor], object]):
        self.callback = callback

    def put(self, tokens: Tensor) -> None:
        self.callback(tokens)

    def end(self) -> None:
        pass


def as_streamer(streamer):
    """None, an object with put(tokens) and end() (transformers' TextStreamer and friends), or a callable that gets
    the same tokens as put: the prompt (B, T) first, then each step's new tokens (B,) as they are chosen."""
    if streamer is None or hasattr(streamer, "put"):
        return streamer
    if callable(streamer):
        return _CallbackStreamer(streamer)
    raise TypeError(f"streamer must have put() and end() (as transformers' TextStreamer) or be callable, got {type(streamer).__name__}")
