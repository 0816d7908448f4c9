"""Data: text, JSONL and Parquet read as the same documents; tokenized once into a cache keyed by tokenizer and file
hashes; packed sequences; a deterministic shuffled order; BPE tokenizers trained and used by a recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from archgen.cli import main
from archgen.train import data as data_module
from archgen.train.data import Sequences, ShuffledOrder, prepare_tokens
from archgen.train.tokenizer import BytesTokenizer, HFTokenizer
from tests.train.recipes import PARAGRAPHS, recipe_dict, write_corpus, write_recipe


def test_text_jsonl_and_parquet_give_the_same_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = PARAGRAPHS[:3]
    (tmp_path / "t").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "t" / f"{i}.txt").write_text(text)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    tokenizer = BytesTokenizer()
    expected = np.concatenate([np.frombuffer(t.encode() + b"\0", dtype=np.uint8) for t in texts]).astype(np.uint16)
    for files in ([tmp_path / "t" / f"{i}.txt" for i in range(3)], [tmp_path / "d.jsonl"], [tmp_path / "d.parquet"]):
        tokens = prepare_tokens(files, [], tokenizer, "text", tmp_path / "cache")
        assert np.array_equal(np.asarray(tokens.train), expected), files


def test_tokens_are_cached_by_tokenizer_and_file_hash(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    first = prepare_tokens([corpus], 0.2, BytesTokenizer(), "text", tmp_path / "cache")
    calls = []
    monkeypatch.setattr(data_module, "_tokenize_into", lambda *a: calls.append(a) or pytest.fail("re-tokenized"))
    again = prepare_tokens([corpus], 0.2, BytesTokenizer(), "text", tmp_path / "cache")
    assert again.manifest == first.manifest and not calls
    monkeypatch.undo()
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more document"}) + "\n")
    changed = prepare_tokens([corpus], 0.2, BytesTokenizer(), "text", tmp_path / "cache")
    assert changed.manifest["key"] != first.manifest["key"]
    documents = lambda tokens: sum(tokens.manifest["documents"].values())  # noqa: E731
    assert documents(changed) == documents(first) + 1
    assert first.manifest["documents"]["validation"] == int(len(PARAGRAPHS) * 6 * 0.2)


def test_sequences_are_packed_windows_and_the_order_is_seeded():
    tokens = np.arange(50, dtype=np.uint16)
    sequences = Sequences(tokens, 8)
    assert sequences.count == 6
    assert sequences.get([1]).tolist() == [list(range(8, 17))]  # 9 tokens: inputs and shifted targets
    order = ShuffledOrder(sequences.count, seed=3)
    epoch = order.indices(0, 6)
    assert sorted(epoch) == list(range(6)) and order.indices(0, 6) == epoch
    assert ShuffledOrder(6, seed=3).indices(4, 5) == epoch[4:] + order.indices(6, 3)
    assert ShuffledOrder(6, seed=4).indices(0, 6) != epoch


def test_tokenizer_train_and_a_recipe_that_uses_it(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    out = CliRunner().invoke(main, ["tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", str(tmp_path / "tok.json")])
    assert out.exit_code == 0, out.output
    tokenizer = HFTokenizer(tmp_path / "tok.json")
    assert tokenizer.vocab_size == 300 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer.encode(PARAGRAPHS[1])) == PARAGRAPHS[1]
    # The spec's vocabulary must match: 256 does not, 300 does.
    recipe = recipe_dict(corpus, tokenizer={"kind": "huggingface", "file": str(tmp_path / "tok.json")}, steps=1, batch__tokens=32)
    bad = CliRunner().invoke(main, ["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"])
    assert bad.exit_code == 2 and "the tokenizer has 300 tokens but the spec's vocabulary is 256" in bad.output
    recipe["spec"]["set"] = ["model.vocab_size=300"]
    good = CliRunner().invoke(main, ["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"])
    assert good.exit_code == 0, good.output


def test_a_saved_datasets_directory_gives_the_train_split_documents(tmp_path):
    """A DatasetDict saved with `datasets` (save_to_disk) reads as its train split's rows, the same tokens as JSONL;
    one without a train split is an error naming the splits it has."""
    datasets = pytest.importorskip("datasets")

    texts = PARAGRAPHS[:3]
    splits = {"train": datasets.Dataset.from_dict({"text": texts, "id": [0, 1, 2]}),
              "test": datasets.Dataset.from_dict({"text": ["held elsewhere"], "id": [3]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    assert data_module.check_source(tmp_path / "saved", "text") is None
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = BytesTokenizer()
    from_disk = prepare_tokens([tmp_path / "saved"], [], tokenizer, "text", tmp_path / "cache")
    from_jsonl = prepare_tokens([tmp_path / "d.jsonl"], [], tokenizer, "text", tmp_path / "cache")
    assert np.array_equal(np.asarray(from_disk.train), np.asarray(from_jsonl.train))
    datasets.DatasetDict({"test": splits["test"]}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(data_module.DataError, match="without a 'train' split \\(it has test\\)"):
        list(data_module.iter_documents(tmp_path / "no_train"))


def test_datasets_directory_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")
    import builtins

    real_import = builtins.__import__
    def without_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_datasets)
    assert "the `datasets` package is not installed" in data_module.check_source(saved, "text")


def test_tiktoken_file(tmp_path):
    """A local .tiktoken file (base64 token, rank per line): here the 256 single bytes, so <|endoftext|> is id 256."""
    import base64

    from archgen.train.tokenizer import TiktokenTokenizer

    path = tmp_path / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    tokenizer = TiktokenTokenizer(str(path))
    assert tokenizer.vocab_size == 257 and tokenizer.eos_id == 256
    text = "Déjà vu: the same tokens."
    assert tokenizer.encode(text) == list(text.encode()) and tokenizer.decode(tokenizer.encode(text)) == text
