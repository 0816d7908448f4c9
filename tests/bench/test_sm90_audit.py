"""bench/sm90_audit.py: its stub driver compiles a kernel for sm_90 without a GPU and reports the cubin's registers;
its tuner stand-in compiles every candidate, records a failing one and returns the untuned default."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from archgen_kernels.triton_support import Autotuner

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_sm90_audit", ROOT / "bench" / "sm90_audit.py")
audit = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = audit  # its dataclasses look their module up
spec.loader.exec_module(audit)


def test_the_stub_driver_compiles_a_kernel_for_sm90_and_reads_its_registers():
    pytest.importorskip("triton.backends.nvidia.driver", reason="this triton has no CUDA backend")
    if not (Path(audit._cuobjdump()).is_file() and (Path(audit._cuobjdump()).parent / "ptxas").is_file()):
        pytest.skip("this triton ships no ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a compile, not the interpreter
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sm90_audit.py"), "--probe"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["kernel"] == "_audit_probe_kernel" and not row["error"]
    assert 8 <= row["registers"] <= 64  # a load, an exp, a multiply and a store per element: few registers
    assert row["spills"] == 0 and row["local_bytes"] == 0 and row["shared"] == 0 and row["num_warps"] == 4


def test_every_candidate_is_compiled_a_failure_recorded_and_the_default_returned(monkeypatch):
    recorder = audit.Recorder()
    monkeypatch.setattr(audit, "RECORDER", recorder)
    monkeypatch.setattr(audit, "OFFERED", {})
    configs = [{"BLOCK": 16, "num_warps": 4}, {"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 8}]
    tuner = SimpleNamespace(name="op.kernel", configs=configs, default=configs[1])
    tuner.untuned_config = functools.partial(Autotuner.untuned_config, tuner)  # the choice a GPU makes untuned
    launched = []

    def launch(config):
        launched.append(config["BLOCK"])
        if config["BLOCK"] == 64:
            raise RuntimeError("PTXASError: ptxas error: Entry function uses too much shared data")
        recorder.launched(audit.Resources("k", 40, 8 * (config["BLOCK"] == 32), 2 * (config["BLOCK"] == 32), 1024),
                          SimpleNamespace(shared=0, num_warps=4, num_stages=3, hash=f"h{config['BLOCK']}"), None)

    assert audit.audit_tune(tuner, "key", launch) == configs[1]
    assert launched == [16, 32, 64]
    rows = {row.config: row for row in recorder.rows}
    assert [rows[c].default for c in ("BLOCK=16,num_warps=4", "BLOCK=32,num_warps=4")] == [False, True]
    assert audit.exceeds(rows["BLOCK=32,num_warps=4"]) == "spills" and audit.exceeds(rows["BLOCK=16,num_warps=4"]) == ""
    assert audit.exceeds(rows["BLOCK=64,num_warps=8"]) == "fails" and "too much shared" in rows["BLOCK=64,num_warps=8"].error
    # a launcher's candidates for this call without the tuner's default: the first candidate is the default
    assert audit.audit_tune(tuner, "key2", launch, candidates=[configs[0]]) == configs[0]
    assert recorder.rows[-1].default
