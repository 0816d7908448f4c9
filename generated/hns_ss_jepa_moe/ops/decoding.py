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
option of `generate` works unchanged.
"""

import dataclasses
from collections.abc import Callable

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
                 device: torch.device):
        self.step_fn = step
        self.empty_cache = empty_cache
        self.cache = None  # the cache the graph reads and writes, from the first prefill on
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None

    def prefill(self, run_prompt: Callable[[object], Tensor]) -> Tensor:
        """Run the prompt into a fresh cache (run_prompt(cache) -> its last logits) and make it the graph's state."""
        cache = self.empty_cache()
        logits = run_prompt(cache)
        length = int(cache.length)
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
