"""The assertion API: bounds, diagnosis-friendly reports, and failures on the faults it exists for."""

from __future__ import annotations

import math

import pytest

from pytest_rlparity import ParityError, Tolerance, assert_logprobs_close, compare_logprobs, metrics

ENGINE = [[-0.5, -1.25, -2.0], [-0.1, -3.0]]


def test_identical_passes_with_zero_stats():
    c = assert_logprobs_close(ENGINE, ENGINE)
    assert c.ok and c.stats["max_abs"] == 0 and c.stats["tokens"] == 5


def test_constant_offset_fails_on_mean_offset_and_reports_it():
    shifted = [[x - 0.3 for x in seq] for seq in ENGINE]
    with pytest.raises(ParityError) as info:
        assert_logprobs_close(ENGINE, shifted, Tolerance(max_abs=1.0, mean_abs=1.0, k3_kl=None, prob_diff_mean=None))
    message = str(info.value)
    assert "mean_offset 0.3 > 1e-05" in message
    assert "worst" in message and "seq" in message  # the table of worst tokens


def test_single_outlier_fails_max_abs_and_heads_the_table():
    trainer = [list(seq) for seq in ENGINE]
    trainer[1][1] = -3.5
    c = compare_logprobs(ENGINE, trainer, Tolerance(mean_abs=None, mean_offset=None, k3_kl=None, prob_diff_mean=None))
    assert not c.ok and c.violations[0].startswith("max_abs 0.5")
    assert (c.worst[0].sequence, c.worst[0].position) == (1, 1)


def test_rtol_scales_with_magnitude():
    trainer = [[-10.0]]
    engine = [[-10.05]]
    loose = Tolerance(max_abs=0.01, rtol=0.01, mean_abs=None, mean_offset=None, k3_kl=None, prob_diff_mean=None)
    assert compare_logprobs(engine, trainer, loose).ok
    assert not compare_logprobs(engine, trainer, loose.replace(rtol=0.0)).ok


def test_token_outside_support_is_counted_not_averaged():
    trainer = [[-0.5, -math.inf, -2.0], [-0.1, -3.0]]
    c = compare_logprobs(ENGINE, trainer)
    assert c.stats["out_of_support"] == 1 and c.stats["max_abs"] == 0
    assert not c.ok
    assert compare_logprobs(ENGINE, trainer, Tolerance(max_out_of_support=0.2)).ok


def test_nan_always_fails():
    trainer = [[-0.5, float("nan"), -2.0], [-0.1, -3.0]]
    c = compare_logprobs(ENGINE, trainer, Tolerance(max_abs=None, mean_abs=None, mean_offset=None, k3_kl=None, prob_diff_mean=None))
    assert not c.ok and "NaN" in c.violations[0]


def test_length_mismatch_is_an_error_not_a_pass():
    with pytest.raises(ValueError, match="same tokens"):
        compare_logprobs([[-1.0, -2.0]], [[-1.0]])


def test_decoded_tokens_appear_in_the_table():
    trainer = [[x - 1 for x in seq] for seq in ENGINE]
    with pytest.raises(ParityError, match=r"'tok5'#5"):
        assert_logprobs_close(ENGINE, trainer, token_ids=[[5, 6, 7], [8, 9]], decode=lambda ids: f"tok{ids[0]}")


def test_metrics_definitions():
    rollout, trainer = [-1.0, -2.0], [-1.0, -2.0 + math.log(2)]
    assert metrics.k3(rollout, trainer) == pytest.approx(0.5 * (2 - 1 - math.log(2)))
    assert metrics.k1(rollout, trainer) == pytest.approx(-math.log(2) / 2)
    assert metrics.ess([1.0, 1.0]) == 1.0 and metrics.ess([1.0, 0.0]) == 0.5
    assert metrics.chi2([1.0, 1.0]) == 0.0
    assert metrics.clip_fraction([0.7, 1.0, 1.3], 0.2, 0.28) == pytest.approx(2 / 3)
    assert metrics.sequence_ratio(rollout, trainer) == pytest.approx(math.sqrt(2))
