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
