"""`archgen generate CHECKPOINT --prompt TEXT`: decode with a trained checkpoint and the tokenizer it was trained with.

A checkpoint carries its generated package (package/), so this needs neither the spec nor archgen's compiler. The
loop is the package's own decoding (a cache, one token per forward, the package's `sample`), written out here so
that each token can be printed as it is produced.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from archgen.train.checkpoint import latest_checkpoint
from archgen.train.package import import_package
from archgen.train.tokenizer import load_saved_tokenizer


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory / its checkpoints/ (then the newest checkpoint in it)."""
    path = Path(path)
    if (path / "trainer.json").exists():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path} is not a checkpoint (no trainer.json) and holds none")


def load_for_generation(checkpoint: Path, device: str = "cpu"):
    package = import_package(checkpoint / "package")
    model = package.Model.from_pretrained(checkpoint, device=device).eval()
    return package, model, load_saved_tokenizer(checkpoint)


@torch.no_grad()
def stream_tokens(package, model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, seed: int | None, stop_id: int | None) -> Iterator[int]:
    sample = package.model.sample
    generator = None
    device = next(model.parameters()).device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    meta = model.meta_tokens.size(0) if hasattr(model, "meta_tokens") else 0
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = model.empty_cache(1, meta + input_ids.size(1) + max_new_tokens)
    kwargs = {"update_memory": True} if "update_memory" in inspect.signature(type(model).forward).parameters else {}
    logits = model(input_ids, cache=cache, **kwargs).logits[:, -1]
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (1, 1)
        value = int(token)
        if stop_id is not None and value == stop_id:
            return
        yield value
        if step + 1 < max_new_tokens:
            logits = model(token, cache=cache, **kwargs).logits[:, -1]


def generate_text(checkpoint: Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = None, seed: int | None = 0, device: str = "cpu",
                  stop_at_eos: bool = True, write: Callable[[str], None] | None = None) -> str:
    """Continue `prompt`; each piece of text is passed to `write` as soon as it decodes. Returns the continuation."""
    checkpoint = resolve_checkpoint(checkpoint)
    package, model, tokenizer = load_for_generation(checkpoint, device)
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eos_id]  # an empty prompt starts a new document
    produced: list[int] = []
    shown = ""
    for token in stream_tokens(package, model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                               tokenizer.eos_id if stop_at_eos else None):
        produced.append(token)
        text = tokenizer.decode(produced)
        if text.endswith("\ufffd"):
            continue  # half of a multi-byte character: wait for the rest
        if write is not None and text.startswith(shown):
            write(text[len(shown):])
        shown = text
    text = tokenizer.decode(produced)
    if write is not None and text != shown and text.startswith(shown):
        write(text[len(shown):])  # a character left unfinished at the end, shown as U+FFFD as decode shows it
    return text
