"""Bad recipes fail before any compute: located at the recipe's file:line:col with the dotted path and a fix, exit 2,
and nothing written (no package built, no output directory)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from archgen.cli import main
from tests.train.recipes import recipe_dict, write_corpus, write_recipe


def run_train(recipe_path):
    return CliRunner().invoke(main, ["train", str(recipe_path), "--no-progress"])


def line_of(text: str, needle: str) -> int:
    """1-based line of the first `needle:` key (or, for a list item, the first line holding `needle`) in the recipe."""
    lines = text.splitlines()
    keyed = [i for i, line in enumerate(lines, 1) if re.match(rf"\s*{re.escape(needle)}:", line)]
    return keyed[0] if keyed else next(i for i, line in enumerate(lines, 1) if needle in line)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data")


def assert_located_failure(result, recipe_path, key: str, path: str, message: str, tmp_path):
    output = result.output
    assert result.exit_code == 2, output
    line = line_of(recipe_path.read_text(), key)
    assert re.search(rf"{re.escape(str(recipe_path))}:{line}:\d+: error: {re.escape(path)}: ", output), output
    assert message in output, output
    assert "fix:" in output, output
    assert not (tmp_path / "data" / "run").exists(), "a bad recipe must be rejected before anything is built"


def test_missing_data_file(tmp_path, corpus):
    recipe = recipe_dict(corpus, data__train=[str(tmp_path / "nowhere.jsonl")])
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_located_failure(run_train(path), path, "nowhere.jsonl", "data.train[0]", "does not exist", tmp_path)


def test_vocabulary_mismatch(tmp_path, corpus):
    recipe = recipe_dict(corpus, spec__set=["model.vocab_size=512"])
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_located_failure(run_train(path), path, "tokenizer", "tokenizer",
                           "the tokenizer has 256 tokens but the spec's vocabulary is 512", tmp_path)


def test_batch_that_does_not_divide(tmp_path, corpus):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, batch__tokens=100))
    assert_located_failure(run_train(path), path, "tokens", "batch.tokens",
                           "is not a multiple of seq_len 16 × micro_batch 2", tmp_path)


def test_sequence_longer_than_the_model(tmp_path, corpus):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, data__seq_len=4096, batch__tokens=8192))
    assert_located_failure(run_train(path), path, "seq_len", "data.seq_len", "do not fit the model's max_seq_len 128", tmp_path)


def test_field_of_the_wrong_type(tmp_path, corpus):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, steps="many"))
    assert_located_failure(run_train(path), path, "steps", "steps", "'many'", tmp_path)


def test_unknown_key_suggests_the_right_one(tmp_path, corpus):
    recipe = recipe_dict(corpus)
    recipe["optimizer"]["weight_decy"] = 0.1
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = run_train(path)
    assert_located_failure(result, path, "weight_decy", "optimizer.weight_decy", "unknown key 'weight_decy'", tmp_path)
    assert "did you mean 'weight_decay'?" in result.output


def test_a_key_in_the_wrong_section_names_the_section_that_takes_it(tmp_path, corpus):
    recipe = recipe_dict(corpus)
    recipe["batch"]["seq_len"] = recipe["data"].pop("seq_len")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = run_train(path)
    assert_located_failure(result, path, "seq_len", "batch.seq_len", "unknown key 'seq_len'", tmp_path)
    assert "'seq_len' belongs under 'data': data: {seq_len: ...}" in result.output


def test_jsonl_without_the_text_field(tmp_path, corpus):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, data__field="body"))
    assert_located_failure(run_train(path), path, "corpus.jsonl", "data.train[0]", "has no string field 'body'", tmp_path)


def test_head_weight_for_a_head_the_spec_lacks(tmp_path, corpus):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus, objectives__heads={"medusa": 0.5}))
    assert_located_failure(run_train(path), path, "medusa", "objectives.heads.medusa", "the spec has no head 'medusa'", tmp_path)


def test_recipe_schema_is_printed():
    result = CliRunner().invoke(main, ["schema", "--recipe"])
    assert result.exit_code == 0
    assert '"steps"' in result.output and '"additionalProperties": false' in result.output


def test_a_batch_that_does_not_fit_the_device(tmp_path, corpus):
    """The floor (weights, gradients, AdamW state, one activation per layer) against a device's memory: checked when
    training on an accelerator; here against a pretend 1 MiB device."""
    from archgen.errors import CompileError
    from archgen.train.checks import memory_floor, plan_training
    from archgen.train.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus))
    loaded = load_recipe(path)
    floor = memory_floor(plan_training(loaded).compiled, loaded.recipe, 1)
    assert floor > 16 * 99_000  # hspmn tiny: 99.4k parameters at 16 bytes, plus activations
    with pytest.raises(CompileError) as caught:
        plan_training(loaded, device_memory=2**20)
    (problem,) = caught.value.diagnostics
    assert problem.path == "batch.micro_batch" and "the device has 0.0 GiB" in problem.message
    assert problem.location.line == line_of(path.read_text(), "micro_batch") and "gradient_checkpointing" in problem.fix
    plan_training(loaded, device_memory=2**30)  # fits
