"""bench/ncu.py reads what ncu leaves: the raw page's CSV, and a binary report cut off before ncu printed its pages."""

import importlib.util
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_ncu", ROOT / "bench" / "ncu.py")
ncu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ncu)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value: int | float | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 1) + struct.pack("<d", value)
    return _varint(number << 3) + _varint(value)


def test_a_binary_report_gives_each_launch_its_metrics_and_stall_samples(tmp_path):
    names = ["gpu__time_duration.sum", "launch__registers_per_thread", "smsp__pcsamp_warps_issue_stalled_barrier",
             "smsp__pcsamp_warps_issue_stalled_long_scoreboard", "smsp__pcsamp_warps_issue_stalled_barrier_not_issued"]
    header = _field(1, 7) + _field(4, b"".join(_field(1, name.encode()) for name in names))
    values = {0: 127200.0, 1: 38, 2: 25, 3: 75, 4: 9}
    launch = _field(1, 0) + b"".join(_field(13, _field(1, index) + _field(2, _field(5 if isinstance(v, int) else 1, v)))
                                     for index, v in values.items())
    path = tmp_path / "x.ncu-rep"
    path.write_bytes(b"NVR\x00" + b"".join(struct.pack("<I", len(m)) + m for m in (header, launch, launch)))
    launches = ncu.read_report(path)
    assert len(launches) == 2
    assert launches[0]["duration_ns"] == 127200.0 and launches[0]["registers"] == 38
    assert launches[0]["stall_samples_pct"] == {"long_scoreboard": 75.0, "barrier": 25.0}


def test_the_raw_page_gives_each_launch_its_metrics():
    page = ('==PROF== Connected\n"ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread",'
            '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"\n"","","nsecond","register/thread",""\n'
            '"0","_rms_norm_fwd_kernel","127,200","38","1.25"\n')
    (launch,) = [ncu._key_metrics(row) for row in ncu._raw_rows(page)]
    assert launch["kernel"] == "_rms_norm_fwd_kernel" and launch["duration_ns"] == 127200.0
    assert launch["registers"] == 38.0 and launch["stalls_cycles_per_issue"] == {"barrier": 1.25}


def test_the_raw_page_gives_the_sampled_stall_reasons_where_it_has_no_ratios():
    page = ('"ID","Kernel Name","smsp__pcsamp_warps_issue_stalled_wait","smsp__pcsamp_warps_issue_stalled_barrier",'
            '"smsp__pcsamp_warps_issue_stalled_barrier_not_issued"\n"","","","",""\n'
            '"0","_backward_dkdv_kernel","3,000","1,000","900"\n')
    (launch,) = [ncu._key_metrics(row) for row in ncu._raw_rows(page)]
    assert launch["stalls_cycles_per_issue"] == {}
    assert launch["stall_samples_pct"] == {"wait": 75.0, "barrier": 25.0}
    assert "wait 75% of samples, barrier 25% of samples" in ncu.summary_lines({"launches": [launch]})[0]
