"""The two graphs a deployment runtime needs, as modules around a generated `Model`: prefill and one decode step.

A generated package keeps its decoding state in a `Cache(layers, length)` whose layers hold small dataclasses
(`KVCache(k, v)`, `MambaCache(conv_state, ssm_state)`, `Mamba2Cache`, `ConvCache`), dicts of them for parallel layers,
or None. Exported graphs take and return plain tensors, so the wrappers flatten that structure into a tuple in a fixed
order and rebuild it, by walking it generically: they know no layer kind, and a kind added later exports unchanged as
long as its state is tensors inside dataclasses, dicts and lists.

    Prefill     input_ids (B, T)[, attention_mask (B, T)]           -> logits (B, T, V), *present
    DecodeStep  input_ids (B, 1), position () int64, *past        -> logits (B, 1, V), *present

With `ragged` the prefill also takes the attention_mask of left-padded prompts (1 token, 0 pad) and the cache carries
each row's pads (`present.pads` / `past.pads`, a tensor like any other), so every row decodes as it would alone.

`position` is the number of positions already in the cache (meta tokens included), i.e. the position of the new token.
A model with a test-time memory writes it in both graphs, as its `generate` does by default.
The step clones every cache tensor it receives before the model writes into it, so the graph is functional: its
inputs are never mutated and its outputs are new tensors a runtime feeds back as the next step's inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import Tensor, nn


def cache_leaves(cache: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor inside `cache` with its dotted path, in a fixed order (fields, dict keys and list items in order).

    Non-tensor leaves (the Cache's int `length`, None for a layer without state) are skipped: they are either rebuilt
    from the template or carried as the explicit `position` input.
    """
    if isinstance(cache, Tensor):
        return [(prefix, cache)]
    join = (lambda key: f"{prefix}.{key}") if prefix else str
    if dataclasses.is_dataclass(cache) and not isinstance(cache, type):
        return [leaf for f in dataclasses.fields(cache) for leaf in cache_leaves(getattr(cache, f.name), join(f.name))]
    if isinstance(cache, dict):
        return [leaf for key, value in cache.items() for leaf in cache_leaves(value, join(key))]
    if isinstance(cache, (list, tuple)):
        return [leaf for i, value in enumerate(cache) for leaf in cache_leaves(value, join(i))]
    return []


def rebuild_cache(template: Any, tensors: list[Tensor]) -> Any:
    """A structure like `template` with its tensors replaced, in `cache_leaves` order, by `tensors` (consumed)."""
    if isinstance(template, Tensor):
        return tensors.pop(0)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        values = {f.name: rebuild_cache(getattr(template, f.name), tensors) for f in dataclasses.fields(template)}
        return dataclasses.replace(template, **{f.name: values[f.name] for f in dataclasses.fields(template) if f.init})
    if isinstance(template, dict):
        return {key: rebuild_cache(value, tensors) for key, value in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(rebuild_cache(value, tensors) for value in template)
    return template


def writing_kwargs(model: nn.Module) -> dict:
    """The forward arguments that make a model with a test-time memory write it (as its generate() does)."""
    return {"update_memory": True} if "update_memory" in inspect.signature(model.forward).parameters else {}


def padded(ragged: bool) -> dict:
    """empty_cache's arguments for a cache with room for the pads of a ragged batch."""
    return {"padded": True} if ragged else {}


class Prefill(nn.Module):
    """input_ids (B, T) [, attention_mask (B, T) when ragged] -> (logits (B, T, V), *present): the prompt's logits
    and the caches it fills."""

    def __init__(self, model: nn.Module, max_len: int, ragged: bool = False):
        super().__init__()
        self.model = model
        self.max_len = max_len
        self.ragged = ragged

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        cache = self.model.empty_cache(input_ids.size(0), self.max_len, **padded(self.ragged))
        masked = {"attention_mask": attention_mask} if self.ragged else {}
        logits = self.model(input_ids, cache=cache, **masked, **writing_kwargs(self.model)).logits  # (B, T, V)
        return (logits, *(t for _, t in cache_leaves(cache)))


class DecodeStep(nn.Module):
    """(input_ids (B, 1), position () int64, *past) -> (logits (B, 1, V), *present): one token against the caches."""

    def __init__(self, model: nn.Module, max_len: int, ragged: bool = False):
        super().__init__()
        self.model = model
        self.template = model.empty_cache(1, max_len, **padded(ragged))  # structure only: its tensors are replaced by the inputs
        self.names = [name for name, _ in cache_leaves(self.template)]

    def forward(self, input_ids: Tensor, position: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = rebuild_cache(self.template, [t.clone() for t in past])
        cache.length = position
        logits = self.model(input_ids, cache=cache, **writing_kwargs(self.model)).logits  # (B, 1, V)
        present = dict(cache_leaves(cache))  # also holds the advanced length, now a tensor: not a cache tensor
        return (logits, *(present[name] for name in self.names))
