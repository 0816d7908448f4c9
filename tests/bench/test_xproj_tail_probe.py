"""bench/xproj_tail_probe.py: the kernel with x_proj in in_proj_conv's tail compiles for sm_90 without spilling, and
the probe's two-launch path runs under the interpreter (the tail itself spins, so only a GPU runs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_probe(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # --dry-run sets it, --compile-only must not
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "xproj_tail_probe.py", "--out", str(tmp_path), *args], cwd=ROOT / "bench",
                          capture_output=True, text=True, env=env, timeout=600)


def test_the_tail_kernel_compiles_for_sm90_with_every_backoff_and_no_spills(tmp_path, monkeypatch):
    pytest.importorskip("triton.backends.nvidia.driver", reason="this triton has no CUDA backend")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # for this test only: bench/ on sys.path hides modules by name
    import sm90_audit

    if not (Path(sm90_audit._cuobjdump()).is_file() and (Path(sm90_audit._cuobjdump()).parent / "ptxas").is_file()):
        pytest.skip("this triton ships no ptxas / cuobjdump")
    done = run_probe("--compile-only", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    launches = json.loads(done.stdout[done.stdout.index("{"):])["launches"]
    assert len(launches) == 3  # the three backoffs
    for launch in launches:
        assert launch["kernel"] == "_in_proj_conv_x_proj_kernel" and not launch["error"]
        assert launch["spills"] == 0 and launch["registers"] <= 64


def test_the_dry_run_runs_the_two_launches_at_tiny_shapes(tmp_path):
    done = run_probe("--dry-run", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "xproj_tail_probe.json").read_text())
    assert results["dry_run"] and results["two_launches_shapes"] == [[1, 32], [1, 32], [1, 6]]
