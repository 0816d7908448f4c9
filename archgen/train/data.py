"""Training data: documents from local files, tokenized once into memory-mapped token files, read as packed
fixed-length sequences in a deterministic shuffled order.

    documents  a .txt/.md file is one document; a .jsonl line or a Parquet row is one (its `field` column); a
               directory saved by Hugging Face `datasets` (`save_to_disk`) gives one per row of its train split
    tokens     every document is encoded and followed by the tokenizer's end-of-document id, all concatenated: one
               uint16/uint32 file for training, one for validation (a held-out fraction of the documents, spread
               evenly over them, or separate files). Cached under cache_dir/<key>, where key hashes the tokenizer
               and every file's sha256, so a changed file or tokenizer re-tokenizes and nothing else does.
    sequences  sequence j is tokens[j·L : j·L + L + 1] (L = seq_len): packed across document boundaries, which the
               end-of-document id marks; inputs are its first L tokens, targets its last L.
    order      global sample i is sequence perm_e[i mod S] of epoch e = i // S, perm_e a permutation drawn from
               (seed, e): the position in the data is one integer, and resuming from it is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


class DataError(ValueError):
    """A data file that cannot be read as the recipe says; the message says what to change."""


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def check_source(path: Path, field: str) -> str | None:
    """Why `path` cannot be read as training data (None when it can): cheap checks run before any tokenizing."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        if not is_datasets_dir(path):
            return "is a directory but not one saved by Hugging Face `datasets` (save_to_disk)"
        try:
            import datasets  # noqa: F401
        except ImportError:
            return "is a Hugging Face `datasets` directory, but the `datasets` package is not installed (pip install datasets)"
        return None
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return None
    if suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        return f"line {number} is not JSON: {error}"
                    if not isinstance(row, dict) or not isinstance(row.get(field), str):
                        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                        return f"line {number} has no string field '{field}' (it has: {keys})"
                    return None
        return "holds no JSON lines"
    if suffix in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return "is Parquet, but `pyarrow` is not installed (pip install 'archgen[train]')"
        names = pq.read_schema(path).names
        return None if field in names else f"has no column '{field}' (it has: {', '.join(names)})"
    return f"has suffix '{suffix}', which is not a known data format"


def iter_documents(path: Path, field: str = "text") -> Iterator[str]:
    path = Path(path)
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {', '.join(loaded)})")
            loaded = loaded["train"]
        for row in loaded:
            yield row[field]
        return
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)[field]
    elif suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(columns=[field]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)
    else:
        yield path.read_text(encoding="utf-8")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class TokenData:
    train: np.ndarray  # memory-mapped token ids
    validation: np.ndarray
    manifest: dict  # files with sha256, documents and tokens, the tokenizer identity, the cache key

    def sequences(self, split: str, seq_len: int) -> Sequences:
        return Sequences(self.train if split == "train" else self.validation, seq_len)


def prepare_tokens(train_files: list[Path], validation, tokenizer, field: str, cache_root: Path) -> TokenData:
    """Tokenize the files once into cache_root/<key>/ (atomically), or open what an earlier run wrote there.

    `validation` is a list of files, or a float: that fraction of the training documents, evenly spread."""
    hashes = {str(path): file_sha256(path) for path in [*train_files, *(validation if isinstance(validation, list) else [])]}
    key_source = {"tokenizer": tokenizer.identity, "field": field, "validation": validation if isinstance(validation, float) else
                  [hashes[str(p)] for p in validation], "train": [hashes[str(p)] for p in train_files], "format": 1}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()[:32]
    directory = cache_root / key
    if not (directory / "manifest.json").exists():
        _tokenize_into(directory, train_files, validation, tokenizer, field, hashes, key)
    manifest = json.loads((directory / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    opened = [np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r") if manifest["tokens"][split] else np.zeros(0, dtype)
              for split in ("train", "validation")]
    return TokenData(opened[0], opened[1], manifest)


def _tokenize_into(directory: Path, train_files, validation, tokenizer, field, hashes, key) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tokenizing-", dir=directory.parent))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    try:
        counts = {"train": 0, "validation": 0}
        documents = {"train": 0, "validation": 0}
        files_manifest = []
        with open(staging / "train.bin", "wb") as train_out, open(staging / "validation.bin", "wb") as validation_out:
            outputs = {"train": train_out, "validation": validation_out}
            validation_files = validation if isinstance(validation, list) else []
            sources = [(p, "train") for p in train_files] + [(p, "validation") for p in validation_files]
            index = 0  # over training documents, for the held-out fraction
            for path, split in sources:
                file_tokens, file_documents = 0, 0
                for text in iter_documents(path, field):
                    target = split
                    if split == "train" and isinstance(validation, float):
                        target = "validation" if int((index + 1) * validation) > int(index * validation) else "train"
                        index += 1
                    ids = np.asarray([*tokenizer.encode(text), tokenizer.eos_id], dtype=dtype)
                    outputs[target].write(ids.tobytes())
                    counts[target] += ids.size
                    documents[target] += 1
                    file_tokens += ids.size
                    file_documents += 1
                files_manifest.append({"path": str(path), "sha256": hashes[str(path)], "split": split,
                                       "documents": file_documents, "tokens": file_tokens})
        manifest = {"key": key, "tokenizer": tokenizer.identity, "field": field, "dtype": np.dtype(dtype).name,
                    "validation": validation if isinstance(validation, float) else "files",
                    "files": files_manifest, "tokens": counts, "documents": documents}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(staging, directory)
        except OSError:  # another process cached the same key first: its files are identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class Sequences:
    """Packed sequences of seq_len + 1 tokens over one token file."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def get(self, indices) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 token ids."""
        L = self.seq_len
        rows = [np.asarray(self.tokens[i * L : i * L + L + 1], dtype=np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))


class ShuffledOrder:
    """Global sample i -> a sequence index, a fresh permutation per epoch drawn from (seed, epoch)."""

    def __init__(self, count: int, seed: int):
        self.count = count
        self.seed = seed
        self._epoch: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
        return self._epoch[1]

    def indices(self, start: int, n: int) -> list[int]:
        return [int(self._permutation(i // self.count)[i % self.count]) for i in range(start, start + n)]
