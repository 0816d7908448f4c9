"""The README's promise holds for a real install, played as a new user would: a wheel built from this checkout,
installed into a fresh virtual environment, builds a spec from another directory with `-o`; `pip install -e` makes the
generated package importable by its name from a script in a third directory, which trains it 20 steps with `labels=`
(the loss is next-token cross-entropy and falls), generates with transformers' arguments, saves, and loads it back in
bfloat16. Nothing is read from the checkout after the wheel is built (templates, runtime ops and kernels come from
the wheel's package data).

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
    import archgen, torch
    import torch.nn.functional as F
    assert {checkout!r} not in archgen.__file__, archgen.__file__
    import installed_tiny
    from installed_tiny import Model
    location = installed_tiny.__file__
    assert "site-packages" not in location and "out/installed_tiny" in location, location  # editable: the built files

    torch.manual_seed(0)
    model = Model()
    tokens = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        out = model(tokens, labels=tokens)
        next_token = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        assert torch.allclose(out.lm_loss, next_token) and torch.allclose(out["loss"], out.lm_loss), (out.lm_loss, next_token)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.after_optimizer_step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval()
    streamed = []
    greedy = model.generate(tokens[:2, :5], max_new_tokens=6, repetition_penalty=1.0, streamer=streamed.append)
    assert greedy.shape == (2, 11) and torch.equal(torch.cat([streamed[0], torch.stack(streamed[1:], 1)], 1), greedy)
    assert torch.equal(model.generate(tokens[:2, :5], max_length=11, do_sample=False), greedy)
    sampled = model.generate(tokens[:2, :5], max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, temperature=0.8,
                             eos_token_id=[1, 2], pad_token_id=0)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 11

    model.save_pretrained("checkpoint")
    loaded = Model.from_pretrained("checkpoint", dtype=torch.bfloat16)
    assert loaded.embed.weight.dtype == torch.bfloat16
    with torch.no_grad():
        error = (loaded(tokens).logits.float() - model(tokens).logits).abs().max() / model(tokens).logits.abs().max()
    assert error < 0.05, error
    print("ok", archgen.__file__, installed_tiny.__file__)
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
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"OMP_NUM_THREADS": "1"}
    run(environment / "bin" / "archgen", "build", "tiny.yaml", "-o", "out", cwd=elsewhere, env=clean)
    package = elsewhere / "out" / "installed_tiny"
    assert (package / "kernels" / "selective_scan.py").is_file(), "the kernel was not copied"
    readme = (package / "README.md").read_text()
    assert "pip install -e out/installed_tiny" in readme and "archgen build tiny.yaml -o out" in readme, readme
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation", "-q", "-e", package,
        cwd=elsewhere, env=clean)
    user = tmp_path / "user"  # a script in a third directory: only the install can make the package importable
    user.mkdir()
    (user / "first_hour.py").write_text(RUN.format(checkout=str(ROOT)))
    assert "ok" in run(python, "first_hour.py", cwd=user, env=clean)
