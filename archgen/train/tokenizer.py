"""Tokenizers a recipe can name: UTF-8 bytes, a Hugging Face `tokenizers` JSON file, a tiktoken encoding.

Each gives `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eos_id` (the document separator that
packing puts after every document) and `identity`, a string that changes whenever the token ids could: it keys the
token cache, and a checkpoint records it so `archgen generate` rebuilds the same tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message says why and what to do."""


class BytesTokenizer:
    """UTF-8 bytes, vocabulary 256 (what every `tiny` preset uses). Byte 0 separates documents: text never holds it."""

    vocab_size = 256
    eos_id = 0
    identity = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "bytes"}


EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>")


@dataclass
class HFTokenizer:
    """A `tokenizers` JSON file (tokenizer.json)."""

    file: Path
    eos: str | None = None

    def __post_init__(self):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("the `tokenizers` package is not installed: pip install 'archgen[train]'") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(self.file))
        except Exception as error:  # noqa: BLE001 (tokenizers raises a bare Exception for unreadable files)
            raise TokenizerError(f"cannot read tokenizer file {self.file}: {error}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        names = [self.eos] if self.eos else list(EOS_CANDIDATES)
        ids = [self._tokenizer.token_to_id(name) for name in names]
        found = [(n, i) for n, i in zip(names, ids, strict=True) if i is not None]
        if not found:
            raise TokenizerError(f"tokenizer {self.file} has none of the end-of-document tokens {', '.join(names)}")
        self.eos_token, self.eos_id = found[0]
        digest = hashlib.sha256(self.file.read_bytes()).hexdigest()
        self.identity = f"huggingface:{digest}:{self.eos_token}"

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def describe(self) -> dict:
        return {"kind": "huggingface", "file": "tokenizer.json", "eos": self.eos_token}


# How text is split before byte-pair merges for a .tiktoken file (GPT-2's pattern; the file holds only the ranks).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class TiktokenTokenizer:
    """A tiktoken encoding by name (from tiktoken's cache) or a local .tiktoken file (base64 token, rank per line)."""

    encoding: str

    def __post_init__(self):
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError("the `tiktoken` package is not installed: pip install 'archgen[train]'") from None
        path = Path(self.encoding)
        try:
            if path.suffix == ".tiktoken" or path.exists():
                from tiktoken.load import load_tiktoken_bpe

                ranks = load_tiktoken_bpe(str(path))
                self._encoding = tiktoken.Encoding(name=path.stem, pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                                   special_tokens={"<|endoftext|>": len(ranks)})
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                self._encoding = tiktoken.get_encoding(self.encoding)
                digest = self.encoding
        except Exception as error:  # noqa: BLE001 (network and file errors surface as many types)
            raise TokenizerError(f"cannot load tiktoken encoding {self.encoding!r}: {error} (a name needs tiktoken's "
                                 "download cache; offline, give the path of a .tiktoken file)") from None
        self.vocab_size = self._encoding.n_vocab
        self.eos_id = self._encoding.eot_token
        self.identity = f"tiktoken:{digest}"

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids if int(i) != self.eos_id])

    def describe(self) -> dict:
        return {"kind": "tiktoken", "encoding": self.encoding}


def make_tokenizer(config, resolve=lambda p: Path(p)):
    """The tokenizer a recipe's `tokenizer:` section (or a checkpoint's tokenizer.json description) names."""
    kind = config["kind"] if isinstance(config, dict) else config.kind
    def get(key, default=None):
        return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    if kind == "bytes":
        return BytesTokenizer()
    if kind == "huggingface":
        return HFTokenizer(resolve(get("file")), get("eos"))
    if kind == "tiktoken":
        encoding = get("encoding")
        local = resolve(encoding)
        return TiktokenTokenizer(str(local) if local.exists() else encoding)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}")


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Write what `load_saved_tokenizer` needs into a checkpoint directory."""
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer.describe(), indent=2) + "\n")
    if isinstance(tokenizer, HFTokenizer):
        (directory / "tokenizer.hf.json").write_bytes(tokenizer.file.read_bytes())


def load_saved_tokenizer(directory: Path):
    described = json.loads((directory / "tokenizer.json").read_text())
    if described["kind"] == "huggingface":
        described = {**described, "file": str(directory / "tokenizer.hf.json")}
    return make_tokenizer(described)


def train_bpe(files: list[Path], vocab_size: int, output: Path, field: str = "text") -> dict:
    """Train a byte-level BPE tokenizer on text / JSONL / Parquet files with `tokenizers`; write tokenizer.json."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise TokenizerError("the `tokenizers` package is not installed: pip install 'archgen[train]'") from None
    from archgen.train.data import iter_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    documents = 0

    def texts():
        nonlocal documents
        for file in files:
            for text in iter_documents(file, field):
                documents += 1
                yield text

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output))
    return {"vocab_size": tokenizer.get_vocab_size(), "documents": documents, "file": str(output)}
