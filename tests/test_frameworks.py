"""Each RL framework's mismatch metric against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from pytest_rlparity.frameworks import FRAMEWORK_METRICS, framework_metrics, table, worst

ROLLOUT = [-1.0, -2.0]
TRAINER = [-1.1, -1.9]
"""Δ = trainer - rollout = (-0.1, +0.1); r = exp(Δ) = (0.904837, 1.105171)."""

BY_HAND = {
    "verl:rollout_corr/kl": 0.0,  # mean(-Δ)
    "verl:rollout_corr/k3_kl": 0.005004,  # ((0.904837 - 1 + 0.1) + (1.105171 - 1 - 0.1)) / 2
    "verl:rollout_corr/chi2_token": 0.020067,  # (0.818731 + 1.221403) / 2 - 1
    "verl:rollout_corr/ess": 0.990164,  # 2.010008² / (2 * 2.040134)
    "verl:rollout_probs_diff_mean": 0.024621,  # (|0.367879 - 0.332871| + |0.135335 - 0.149569|) / 2
    "NeMo-RL:token_mult_prob_error": 1.105171,  # mean(exp(|Δ|)) = e^0.1
    "prime-rl:mismatch_kl": 0.005004,  # the k3 estimator, as verl's
    "slime:train_rollout_logprob_abs_diff": 0.1,
    "TRL:sampling_logp_difference/mean": 0.1,
    "TRL:sampling_logp_difference/max": 0.1,
}


def test_every_framework_metric_matches_the_hand_computed_value():
    computed = framework_metrics(ROLLOUT, TRAINER)
    assert set(computed) == set(BY_HAND) == {f"{m.framework}:{m.name}" for m in FRAMEWORK_METRICS}
    for key, expected in BY_HAND.items():
        assert computed[key] == pytest.approx(expected, abs=2e-6), key


def test_tokens_outside_the_support_are_left_out_and_no_token_gives_nothing():
    assert framework_metrics([*ROLLOUT, -math.inf], [*TRAINER, -3.0]) == framework_metrics(ROLLOUT, TRAINER)
    assert framework_metrics([], []) == {}


def test_the_worst_value_over_checks_is_judged_against_each_documented_limit():
    clean = framework_metrics([-1.0, -2.0], [-1.0 - 1e-6, -2.0 + 1e-6])
    rows = {r["metric"]: r for r in worst([clean, framework_metrics(ROLLOUT, TRAINER)])}
    assert rows["token_mult_prob_error"]["worst"] == pytest.approx(1.105171, abs=2e-6)
    assert rows["token_mult_prob_error"]["verdict"] == "ALARM"  # above NeMo-RL's 1.05
    assert rows["rollout_corr/ess"]["worst"] == pytest.approx(0.990164, abs=2e-6)  # the lowest ESS is the worst
    assert rows["rollout_corr/ess"]["verdict"] == "ok"
    assert rows["sampling_logp_difference/max"]["limit"] == "-"  # TRL logs it without a limit
    lines = table(list(rows.values()))
    assert lines[0].split() == ["framework", "metric", "worst", "alarm", "at", "verdict"]
    assert any("NeMo-RL" in line and "ALARM" in line for line in lines)
