"""The end-of-session report: JSON for dashboards, a plot per failing comparison, advice, downstream marking."""

from __future__ import annotations

import json

import pytest

from pytest_rlparity.layers import LAYERS, causes
from pytest_rlparity.record import Outcome, advice_for, build_report

FAILING_RUN = """
    import pytest
    from pytest_rlparity import ParityError, Tolerance, assert_logprobs_close

    @pytest.mark.semantic
    def test_sem():
        assert_logprobs_close([[-1.0, -2.0, -0.5]], [[-1.5, -2.0, -0.5]], Tolerance(max_abs=1e-3), title="engine vs trainer", layer="semantic")

    @pytest.mark.inference_path
    def test_path():
        assert_logprobs_close([[-1.0, -2.0]], [[-1.0, -2.0]], Tolerance(max_abs=1e-3), title="cached vs cold", layer="inference_path")

    @pytest.mark.objective
    def test_obj():
        raise ParityError("[objective] ratio 1.3 at step 0", layer="objective", cause="backend mismatch at step 0")
"""


def test_failing_run_writes_a_json_report_with_statistics_tolerances_and_a_plot(pytester):
    pytester.makepyfile(FAILING_RUN)
    result = pytester.runpytest("--rlparity", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    report = json.loads((pytester.path / "rlparity-artifacts" / "report.json").read_text())
    assert report["format"] == "pytest-rlparity-report/1"
    assert report["run"]["engine"] == "vllm" and report["run"]["model_fingerprint"].startswith("sha256:")
    assert report["layers"] == {
        "semantic": {"verdict": "failed", "passed": 0, "failed": 1, "skipped": 0},
        "inference_path": {"verdict": "ok", "passed": 1, "failed": 0, "skipped": 0},
        "objective": {"verdict": "failed", "passed": 0, "failed": 1, "skipped": 0},
    }
    sem, path, obj = report["tests"]
    (check,) = sem["checks"]
    assert check["verdict"] == "fail" and check["stats"]["max_abs"] == 0.5 and check["tolerance"]["max_abs"] == 1e-3
    assert check["violations"][0].startswith("max_abs 0.5 > 0.001")
    plot = pytester.path / "rlparity-artifacts" / check["plot"].rsplit("/", 1)[-1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path["checks"][0]["verdict"] == "pass" and "plot" not in path["checks"][0]
    assert obj["downstream_of"] == ["semantic"] and obj["cause"] == "backend mismatch at step 0"
    assert sem["downstream_of"] == [] and obj["advice"] == causes.BACKEND_MISMATCH.advice
    result.stdout.fnmatch_lines(["*FAILED*test_sem*", "*plot: *test_sem-0.png", "*FAILED*test_obj*probably downstream of the failing semantic layer*"])


def test_report_can_be_moved_or_switched_off(pytester):
    pytester.makepyfile(FAILING_RUN)
    pytester.runpytest("--rlparity", "-p", "no:cacheprovider", "--rlparity-report", "out/r.json")
    assert json.loads((pytester.path / "out" / "r.json").read_text())["tests"]
    pytester.runpytest("--rlparity", "-p", "no:cacheprovider", "--rlparity-report", "none", "-k", "test_path")
    assert not (pytester.path / "rlparity-artifacts" / "report.json").exists()


def test_causes_are_defined_once_and_a_finding_cannot_name_an_undefined_one():
    """Checks name causes as values: a misspelt cause fails where the finding is built, not in a report."""
    import pathlib
    import re

    from pytest_rlparity.layers.result import Finding

    package = pathlib.Path(__file__).parents[1] / "pytest_rlparity"
    source = "\n".join(p.read_text() for d in ("layers", "suite") for p in (package / d).glob("*.py"))
    assert not re.findall(r'Finding\(\s*"|cause="', source), "a check names a cause by a string literal"
    assert len(set(causes.CAUSES)) == len(causes.CAUSES) and all(advice_for(name) for name in causes.CAUSES)
    assert {c.layer for c in causes.CAUSES.values()} <= {"semantic", "inference_path", "objective", "any"}
    assert causes.for_kwarg("async_scheduling").seed_fix == "async_scheduling=False"
    with pytest.raises(TypeError, match="not defined in pytest_rlparity.layers.causes"):
        Finding("logprob mode", "misspelt")


def test_report_marks_failures_above_a_failing_layer_as_downstream():
    outcomes = [
        Outcome("t::a", "inference_path", "failed", "prefix caching"),
        Outcome("t::b", "semantic", "passed"),
        Outcome("t::c", "objective", "failed", "mismatch after a weight update"),
    ]
    report = build_report({"engine": "vllm"}, outcomes, LAYERS)
    assert [t["nodeid"] for t in report["tests"]] == ["t::b", "t::a", "t::c"]
    assert report["tests"][1]["downstream_of"] == [] and report["tests"][2]["downstream_of"] == ["inference_path"]
    assert report["tests"][1]["advice"].startswith("try enable_prefix_caching=false")
