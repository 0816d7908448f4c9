"""Every Python example in README.md and in a generated package's README runs as written.

The examples import the generated package by its name (`from hspmn import Model`), as after `pip install -e
generated/hspmn`; here the package is built at its `tiny` preset into a scratch directory whose generated/ is put on
the import path instead of installing it (tests/test_install.py installs one for real). Each README's blocks run in
order as one function (its own names), in a fresh process started from that scratch directory; README.md's examples
share the HSPMN build and process with the HSPMN package's README. A block fenced as ```python gpu or ```python network is
skipped by name.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from archgen.testing import build_generated
from tests.conftest import ROOT

FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
SKIPPED_MARKS = {"gpu": "needs a GPU", "network": "needs the network"}


def python_blocks(markdown: str) -> list[tuple[str, str]]:
    """(marks, code) of every ```python block, in order."""
    return [(marks.strip(), code) for marks, code in FENCE.findall(markdown)]


def runnable(markdown: str, name: str) -> str:
    """The README's python blocks as one script, the blocks marked gpu or network left out (and said so)."""
    blocks = python_blocks(markdown)
    assert blocks, f"{name} has no python examples"
    for marks, _ in blocks:
        for mark in set(marks.split()) & set(SKIPPED_MARKS):
            print(f"skipping a {name} block: {SKIPPED_MARKS[mark]}")
    return "\n".join(code for marks, code in blocks if not set(marks.split()) & set(SKIPPED_MARKS))


def run_scripts(scripts: dict[str, str], workdir: Path) -> None:
    """Run each README's examples in order, in one fresh process (one torch import), from `workdir`."""
    script = workdir / "examples.py"
    script.write_text("\n".join(f"def {name}():\n" + textwrap.indent(code, "    ") + f"\n\n{name}()\n"
                                for name, code in scripts.items()))
    # One thread: tiny models gain nothing from more, and on a shared CPU the threads wait on each other (9 s, not 60).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir / "generated"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"examples of {', '.join(scripts)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_python_blocks_are_found_with_their_marks():
    text = "a\n```python\nx = 1\n```\n```python gpu\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [("", "x = 1\n"), ("gpu", "y = 2\n")]


@pytest.mark.parametrize("spec", ["hspmn", "nexus"])  # no training hook; JEPA's hook, memory and symbolic module
def test_readme_examples_run(tmp_path, spec):
    """README.md's examples (they use HSPMN) and the generated README's, at the tiny preset."""
    package = build_generated(ROOT / "specs" / f"{spec}.yaml", tmp_path / "generated", "tiny")[0]
    generated = (Path(package.__path__[0]) / "README.md").read_text()
    install = f"pip install -e {(tmp_path / 'generated').as_posix()}/{spec}"
    assert install in generated, "the install line names where it was built"
    scripts = {"readme": runnable((ROOT / "README.md").read_text(), "README.md")} if spec == "hspmn" else {}
    scripts[f"generated_{spec}_readme"] = runnable(generated, f"generated/{spec}/README.md")
    run_scripts(scripts, tmp_path)


def test_readme_recipe_is_the_shipped_pydoc_recipe():
    """The recipe README.md shows under "Training" says what recipes/pydoc_topics.yaml says (the file may set more),
    and the file is a valid recipe."""
    import yaml

    from archgen.train.recipe import load_recipe

    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"`recipes/pydoc_topics\.yaml` is a complete one:\n\n```yaml\n(.*?)^```", readme, re.S | re.M)
    assert shown, "README.md's Training section shows the recipe"
    shipped = yaml.safe_load((ROOT / "recipes" / "pydoc_topics.yaml").read_text())
    for key, value in yaml.safe_load(shown.group(1)).items():
        assert shipped[key] == value, f"README.md shows {key}: {value}, recipes/pydoc_topics.yaml has {shipped[key]}"
    assert load_recipe(ROOT / "recipes" / "pydoc_topics.yaml").recipe.steps == shipped["steps"]


def test_the_pydoc_example_holds_out_text_it_does_not_train_on(tmp_path):
    """recipes/pydoc_topics_data.py (the README's data command) leaves out the topics nested in others, so of the
    held-out split the recipe makes, under 2% of the 64-byte windows occur in the training tokens (48% with every
    topic: a held-out loss would mostly measure recall)."""
    import json

    import numpy as np
    import yaml

    from archgen.train.data import prepare_tokens
    from archgen.train.tokenizer import BytesTokenizer
    from bench.harness import load_module

    assert "python recipes/pydoc_topics_data.py > data/pydoc_topics.jsonl" in (ROOT / "README.md").read_text()
    data = load_module("pydoc_topics_data", "recipes/pydoc_topics_data.py")
    corpus = tmp_path / "pydoc_topics.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in data.distinct_topics()))
    fraction = yaml.safe_load((ROOT / "recipes" / "pydoc_topics.yaml").read_text())["data"]["validation"]["fraction"]
    tokens = prepare_tokens([corpus], fraction, BytesTokenizer(), "text", tmp_path / "cache")
    train, held_out = (np.asarray(split).astype(np.uint8).tobytes() for split in (tokens.train, tokens.validation))
    seen = {train[i : i + data.WINDOW] for i in range(len(train) - data.WINDOW + 1)}
    windows = [held_out[i : i + data.WINDOW] for i in range(len(held_out) - data.WINDOW + 1)]
    assert windows and sum(window in seen for window in windows) / len(windows) < 0.02


PORTABLE_ARITHMETIC = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
"""The environment under which the README's pydoc figures are the same on every x86 CPU: ATen's unvectorized kernels
and MKL's conditional numerical reproducibility (measured: the same figures with MKL limited to SSE4.2 and oneDNN to
SSE4.1)."""


def test_the_pydoc_example_runs_as_written_and_beats_the_unigram_baseline_as_the_readme_says(tmp_path):
    """README.md's three commands (data, `archgen train recipes/pydoc_topics.yaml`, `archgen generate`), run as written
    from a copy of the repository's layout: the held-out perplexity at each evaluation is the README table's (it
    fails when training, the data split or the recipe changes what the table shows) and ends below the unigram
    baseline's, which a broken training would not. The whole recipe takes about 30 s of one CPU core."""
    from archgen.train.metrics import read_metrics

    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"The real-data example:.*?```bash\n(.*?)^```", readme, re.S | re.M)
    assert commands, "README.md's Training section shows the example's commands"
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    (tmp_path / "specs").symlink_to(ROOT / "specs")
    # `python` is this interpreter and `archgen` this checkout's, whichever are on the PATH or installed. ATen's and
    # MKL's portable code paths, as the README says: with each CPU's own vector paths the step-80 perplexity measured
    # 16.96-17.19 on one machine (17.15 on session 8's), a spread training's float32 rounding grows from its first steps
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **PORTABLE_ARITHMETIC}
    programs = {"python": shlex.quote(sys.executable), "archgen": f"{shlex.quote(sys.executable)} -m archgen"}
    outputs = []
    for command in commands.group(1).strip().splitlines():
        command = re.sub(r"(^|&& )(python|archgen) ", lambda m: f"{m[1]}{programs[m[2]]} ", command)
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    assert outputs[-1].startswith("The with statement") and len(outputs[-1]) > len("The with statement")

    table = re.search(r"^\| step \| held-out loss \| perplexity \| unigram baseline \|\n\|[-|]+\|\n((?:\|.*\n)+)",
                      readme, re.M)
    assert table, "README.md's Training section shows the example's held-out perplexity"
    shown = [[float(cell) for cell in row.strip("|").split("|")] for row in table.group(1).splitlines()]
    measured = [[r["step"], r["eval_loss"], r["eval_perplexity"], math.exp(r["unigram_loss"])]
                for r in read_metrics(tmp_path / "runs" / "pydoc_topics" / "metrics.jsonl") if "eval_loss" in r]
    assert [row[0] for row in measured] == [row[0] for row in shown], "the README's table has a row per evaluation"
    for (step, *figures), (_, *expected) in zip(measured, shown, strict=True):
        # the table rounds to 3 and 2 decimals
        assert figures == pytest.approx(expected, rel=5e-3), f"step {step}: measured {figures}, README {expected}"
    _, _, perplexity, unigram = measured[-1]
    assert perplexity < unigram
