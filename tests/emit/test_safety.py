"""Nothing from a spec is ever executed: hostile strings are rejected or escaped, and generated code compiles."""

from __future__ import annotations

import pytest
import yaml

from archgen.errors import CompileError
from archgen.spec.load import load_spec_text
from tests.conftest import ROOT, build_package

BASE = (ROOT / "specs" / "hspmn.yaml").read_text()

HOSTILE_TEXT = [
    'x"""\nimport os; os.system("touch {marker}")\n"""',
    "{{{{ ''.__class__.__mro__ }}}} {{% for x in [1] %}}{{{{x}}}}{{% endfor %}}",
    "ends with a backslash \\",
    "quote at the end\"",
    "'''\nraise SystemExit('{marker}')\n'''",
]


@pytest.mark.parametrize("text", HOSTILE_TEXT, ids=["triple-quote", "jinja", "backslash", "quote", "single-quotes"])
def test_hostile_description_is_escaped_and_never_runs(text, tmp_path):
    marker = tmp_path / "PWNED"
    description = text.format(marker=marker)
    data = yaml.safe_load(BASE)
    data["description"] = description
    spec = tmp_path / "hostile.yaml"
    spec.write_text(yaml.safe_dump(data), encoding="utf-8")
    package = build_package(spec, tmp_path / "out", "tiny")
    assert not marker.exists()
    # The text survives verbatim (up to line wrapping) as documentation, and nothing else.
    assert " ".join(description.split()) in " ".join(package.model.__doc__.split())
    assert package.Model()


HOSTILE_NAMES = ["class", "Bad", "a-b", "x\ny", "__import__('os')", "{{x}}", "a" * 64]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_model_names_are_rejected(name):
    data = yaml.safe_load(BASE)
    data["name"] = name
    with pytest.raises(CompileError, match="name"):
        load_spec_text(yaml.safe_dump(data), "hostile.yaml")


@pytest.mark.parametrize("name", HOSTILE_NAMES + ["none"])
def test_hostile_component_names_are_rejected(name):
    data = yaml.safe_load(BASE)
    data["mixers"][name] = data["mixers"].pop("reflex")
    data["layout"]["mixers"] = f"{name}|context"
    with pytest.raises(CompileError, match="mixers"):
        load_spec_text(yaml.safe_dump(data), "hostile.yaml")


def test_overrides_with_code_do_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    override = f'description=""" + __import__("os").system("touch {marker}") + """'
    build_package(ROOT / "specs" / "hspmn.yaml", tmp_path / "out", "tiny", (override,))
    assert not marker.exists()
