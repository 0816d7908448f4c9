"""bench/harness.py: what every benchmark script shares. A bar row's ratio never rounds onto its bar, and the GPU's
state beside a timing is nvidia-smi's, or an error saying why there is none."""

import os
import stat

import pytest

from bench import harness


@pytest.mark.parametrize(("ratio", "bar", "expected"), [
    (0.49953, 0.5, 0.4995),  # Hymba+'s decode at 2.002x its floor: 0.5 at 3 decimals, a pass it was not
    (0.499999, 0.5, 0.4999),
    (0.50004, 0.5, 0.5),
    (1.23456, 1.0, 1.2346),
    (0.8, 1.0, 0.8),
])
def test_a_ratio_below_its_bar_stays_below_it(ratio, bar, expected):
    assert harness.bar_ratio(ratio, bar) == expected
    assert (harness.bar_ratio(ratio, bar) >= bar) == (ratio >= bar)


def test_the_gpu_state_is_what_nvidia_smi_prints(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '1980 MHz, 3201 MHz, 0x0000000000000004, 312.50 W, 47, 88 %, 20111 MiB'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    state = harness.gpu_state()
    assert state["clocks.sm"] == "1980 MHz"
    assert state["clocks_throttle_reasons.active"] == "0x0000000000000004"
    assert state["memory.used"] == "20111 MiB"


def test_without_nvidia_smi_the_state_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi
    assert "error" in harness.gpu_state()
