"""The README's promise holds for a real install: a wheel built from this checkout, installed into a fresh virtual
environment, builds a spec from another directory into a package that imports and trains. Nothing is read from the
checkout after the wheel is built (templates, runtime ops and kernels come from the wheel's package data).

The fresh environment sees this environment's site-packages through a .pth file (after its own), so torch and the
other dependencies are not installed again; archgen itself resolves to the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.install

SPEC = textwrap.dedent("""\
    schema_version: 1
    name: installed_tiny
    model: {d_model: 16, vocab_size: 64, max_seq_len: 32}
    mixers:
      attn: {kind: attention, n_heads: 2}
      ssm: {kind: mamba, d_state: 4, d_conv: 4, expand: 2}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 32}
    layout: {mixers: [ssm, attn], ffns: mlp}
    """)

RUN = textwrap.dedent("""\
    import sys
    import archgen, torch
    assert {checkout!r} not in archgen.__file__, archgen.__file__
    sys.path.insert(0, "out")
    import installed_tiny
    model = installed_tiny.Model()
    tokens = torch.randint(0, 64, (2, 9))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss), out.loss
    print("ok", archgen.__file__)
    """)


def run(*command, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_a_wheel_installs_builds_and_runs_a_spec_from_elsewhere(tmp_path):
    # The wheel, with setuptools' build directory out of the checkout (a stale build/lib would leak into it).
    (tmp_path / "setup.cfg").write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n")
    env = {**os.environ, "DIST_EXTRA_CONFIG": str(tmp_path / "setup.cfg")}
    run(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        cwd=tmp_path, env=env)
    [wheel] = (tmp_path / "dist").glob("archgen-*.whl")

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tiny.yaml").write_text(SPEC)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run(environment / "bin" / "archgen", "build", "tiny.yaml", "-o", "out", cwd=elsewhere, env=clean)
    assert (elsewhere / "out" / "installed_tiny" / "kernels" / "selective_scan.py").is_file(), "the kernel was not copied"
    assert "ok" in run(python, "-c", RUN.format(checkout=str(ROOT)), cwd=elsewhere, env=clean)
