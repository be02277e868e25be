"""The benchmark's arithmetic, on a report of known numbers (the timings themselves are measured, not asserted)."""

from __future__ import annotations

from pytest_rlparity.bench import summarize


def test_checks_are_test_time_less_engine_starts_and_the_ratio_uses_the_longest_start():
    report = {
        "run": {"engine_starts": [
            {"seconds": 10.0, "kwargs": {"engine_core": "inline", "seed": 0}, "worker": None},
            {"seconds": 24.0, "kwargs": {"engine_core": "process", "enable_prefix_caching": True}, "worker": "gw1"},
        ]},
        "tests": [{"duration_s": 30.0, "outcome": "passed"}, {"duration_s": 20.0, "outcome": "passed"}, {"duration_s": 0.0, "outcome": "skipped"}],
    }
    lines = summarize(report, wall=60.0)
    assert lines[0] == "tests: 2 passed, 0 failed, 1 skipped"
    assert '{"enable_prefix_caching": true, "engine_core": "process"}  [gw1]' in lines[2]
    assert "34.0 s in all, longest 24.0 s" in lines[4]
    assert lines[5].split() == ["checks", "16.0", "s"]
    assert lines[6] == "wall / (longest start + checks) = 1.50"


def test_under_xdist_the_checks_are_shared_by_the_workers_and_each_worker_is_shown():
    report = {
        "run": {"engine_starts": [
            {"seconds": 20.0, "kwargs": {}, "worker": "gw0"},
            {"seconds": 10.0, "kwargs": {}, "worker": "gw1"},
            {"seconds": 5.0, "kwargs": {}, "worker": "gw1"},
        ]},
        "tests": [
            {"duration_s": 50.0, "outcome": "passed", "worker": "gw0"},
            {"duration_s": 25.0, "outcome": "passed", "worker": "gw1"},
            {"duration_s": 15.0, "outcome": "passed", "worker": "gw1"},
        ],
    }
    lines = summarize(report, wall=55.0)
    assert "  worker gw0: 1 starts (20.0 s), checks 30.0 s, busy 50.0 s" in lines
    assert "  worker gw1: 2 starts (15.0 s), checks 25.0 s, busy 40.0 s" in lines
    assert lines[-2].split() == ["checks", "55.0", "s", "(on", "2", "workers)"]
    assert lines[-1] == "wall / (longest start + checks / workers) = 1.16"  # 55 / (20 + 55 / 2) = 1.158


def test_each_worker_shows_when_its_first_test_began_and_its_last_ended():
    report = {
        "run": {"engine_starts": [{"seconds": 20.0, "kwargs": {}, "worker": "gw0"}]},
        "tests": [
            {"duration_s": 30.0, "outcome": "passed", "worker": "gw0", "began": 1000.0 + 9.5, "ended": 1000.0 + 39.5},
            {"duration_s": 10.0, "outcome": "passed", "worker": "gw0", "began": 1000.0 + 39.5, "ended": 1000.0 + 49.5},
        ],
    }
    assert "  worker gw0: 1 starts (20.0 s), checks 20.0 s, busy 40.0 s, in tests from 9.5 s to 49.5 s" in summarize(report, 52.0, started=1000.0)
    assert "outside tests           12.0 s   (9.5 s before the first: start-up and collection; 2.5 s after the last: closing engines, exit)" in summarize(report, 52.0, started=1000.0)
    assert "  worker gw0: 1 starts (20.0 s), checks 20.0 s, busy 40.0 s" in summarize(report, 52.0)  # no start time: no timeline
    assert not any(line.startswith("outside tests") for line in summarize(report, 52.0))


def test_a_configuration_started_twice_is_flagged_with_its_workers():
    report = {
        "run": {"engine_starts": [
            {"seconds": 40.0, "kwargs": {"enable_prefix_caching": True}, "worker": "gw0"},
            {"seconds": 41.0, "kwargs": {"enable_prefix_caching": True}, "worker": "gw3"},
            {"seconds": 9.0, "kwargs": {"enable_prefix_caching": False}, "worker": "gw1"},
        ]},
        "tests": [{"duration_s": 50.0, "outcome": "passed", "worker": "gw0"}],
    }
    flagged = [line for line in summarize(report, wall=60.0) if "DUPLICATE" in line]
    assert flagged == ['  DUPLICATE: one configuration started 2 times (gw0 40.0 s, gw3 41.0 s): {"enable_prefix_caching": true}']
