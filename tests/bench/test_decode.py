"""bench/decode.py's replay timeline: how a profiled replay's kernels become span, busy and idle time."""

import pytest

from bench.harness import ROOT, load_module


@pytest.fixture(scope="module")
def decode():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling `harness` as a script does
        yield load_module("bench_decode", "bench/decode.py")


def test_overlapping_kernels_count_once_in_busy_time_and_replays_split_at_long_gaps(decode):
    kernels = [(0.0, 10.0, "gemv"), (5.0, 12.0, "attention"), (20.0, 25.0, "norm"),  # one replay: 0-25
               (5000.0, 5004.0, "gemv")]  # the next, after a pause
    timeline = decode.replay_timeline(kernels)
    first, second = timeline["replays"]
    assert first == {"kernels": 3, "span_us": 25.0, "kernel_sum_us": 22.0, "busy_us": 17.0, "idle_us": 8.0}
    assert second["kernels"] == 1 and second["span_us"] == 4.0
    assert timeline["last_replay_top"] == [{"name": "gemv", "us": 4.0}]
    # the fastest replay of more than one kernel, each kernel from that replay's start
    assert timeline["fastest_replay_kernels"] == [[0.0, 10.0, "gemv"], [5.0, 7.0, "attention"], [20.0, 5.0, "norm"]]


def test_a_kernel_inside_a_longer_one_adds_no_busy_time(decode):
    timeline = decode.replay_timeline([(0.0, 10.0, "long"), (2.0, 4.0, "short")])
    assert timeline["replays"][0]["busy_us"] == 10.0


def test_steady_steps_run_from_one_greedy_pick_to_the_next(decode):
    pick = "_greedy_pick_kernel"
    kernels = []
    for step in range(5):  # each step: a GEMV, then 2 µs idle, then the pick; 10 µs apart
        t = 10.0 * step
        kernels += [(t, t + 5.0, "gemv"), (t + 7.0, t + 8.0, pick)]
    timeline = decode.steady_steps(kernels)
    # the steps between picks 1-2 and 2-3 (the first and last are not steady): 10 µs each, 6 busy, 4 idle
    assert timeline["steps"] == [{"span_us": 10.0, "busy_us": 6.0, "idle_us": 4.0}] * 2
    assert timeline["median_step_kernels"] == [[2.0, 5.0, "gemv"], [9.0, 1.0, pick]]
    assert "error" in decode.steady_steps(kernels[:6])


def test_a_probe_takes_its_folder_rounds_and_budget(decode, tmp_path):
    args = decode.probe_parser("doc", 90.0).parse_args(["--out", str(tmp_path / "probe")])
    assert (args.out, args.rounds, args.budget_s) == (tmp_path / "probe", 2, 90.0)
    args = decode.probe_parser("doc", 90.0).parse_args(["--out", "o", "--rounds", "3", "--budget-s", "10"])
    assert (args.rounds, args.budget_s) == (3, 10.0)
