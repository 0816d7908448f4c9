"""Model-level limits: rules between fields that a forward pass needs, and bounds that keep checking a spec cheap.

Field-level bounds (each width at most 2**24, depths at most 256) live on the models. These rules relate a field to
the sequence length the model is built for, so a spec that checks also runs: meta tokens, a memory chunk or an
attention window longer than `max_seq_len` describe a model whose first forward pass either has no room for text or
allocates for positions no sequence reaches (100,001 meta tokens with max_seq_len 128 once asked for 80 GB on a
forward pass of 8 tokens).

Checking cost: `archgen check` compiles the base spec and every preset, in time linear in their layers (about 1 ms
per layer of the heaviest kind: five parallel mixers and a mixture of experts, most of it building the IR graph and
summing its costs). MAX_LAYERS (in archgen.resolve.layout_types) and MAX_PRESETS bound that product, so the largest
accepted spec checks in a few seconds; tests/spec/test_model_limits.py times it.
"""

from __future__ import annotations

from archgen.errors import Diagnostic
from archgen.spec import models

MAX_PRESETS = 8  # the seed specs define 2 to 5


def check_model_limits(spec: models.Spec) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    max_len = spec.model.max_seq_len
    if spec.meta_tokens is not None and spec.meta_tokens.count >= max_len:
        problems.append(Diagnostic(
            "meta_tokens.count", f"{spec.meta_tokens.count} meta tokens fill all max_seq_len={max_len} positions: every "
            "sequence starts with them, so no position is left for text",
            f"use at most {max(1, max_len // 2)} meta tokens (Hymba uses 128), or raise model.max_seq_len above "
            f"{spec.meta_tokens.count}"))
    if spec.memory is not None and spec.memory.chunk_size > max_len:
        problems.append(Diagnostic(
            "memory.chunk_size", f"chunk_size={spec.memory.chunk_size} exceeds max_seq_len={max_len}: the memory writes "
            "only complete chunks, so no sequence would ever write it",
            f"use a chunk_size of at most {max_len}, e.g. {min(64, max_len)}"))
    for name, mixer in spec.mixers.items():
        window = getattr(mixer, "window", None)
        if window is not None and window > max_len:
            problems.append(Diagnostic(
                f"mixers.{name}.window", f"window={window} exceeds max_seq_len={max_len}: the cache would hold positions "
                "no sequence reaches",
                f"omit window for full causal attention, or use a window below {max_len}"))
        chunk = getattr(mixer, "chunk_size", None)
        if chunk is not None and chunk > max_len:
            problems.append(Diagnostic(
                f"mixers.{name}.chunk_size", f"chunk_size={chunk} exceeds max_seq_len={max_len}: every scan would pad "
                "its input to a chunk longer than any sequence",
                f"use a chunk_size of at most {max_len}, e.g. {min(256, max_len)}"))
    if len(spec.presets) > MAX_PRESETS:
        problems.append(Diagnostic(
            "presets", f"{len(spec.presets)} presets: `archgen check` compiles every one, and at most {MAX_PRESETS} "
            "are allowed", f"keep at most {MAX_PRESETS} presets, or move variants into their own spec files"))
    return problems
