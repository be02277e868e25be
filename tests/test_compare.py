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


@pytest.mark.parametrize(("engine", "trainer"), [([], []), ([[], []], [[], []])])
def test_a_comparison_of_no_token_fails_because_it_checked_nothing(engine, trainer):
    c = compare_logprobs(engine, trainer)
    assert c.empty and not c.ok and "checks nothing" in c.violations[0]
    with pytest.raises(ParityError, match="no token to compare"):
        assert_logprobs_close(engine, trainer)


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


def noisy(seqs, scale, seed):
    """The same logprobs with reproducible noise of mean |Δ| about ``scale``: a reduced-precision copy."""
    import random

    rng = random.Random(seed)
    return [[x + rng.gauss(0.0, scale * 1.25) for x in seq] for seq in seqs]


REFERENCE = [[-0.2 - 0.05 * (i % 7) - 0.3 * (j % 3) for i in range(40)] for j in range(8)]


def test_a_bf16_tolerance_scales_to_the_precision_floor_whatever_the_model_size():
    """The same clean engine passes at a small and a large noise floor; 10x its floor fails either way."""
    from pytest_rlparity.numerics import numerics_for

    bf16 = numerics_for("bfloat16").tolerance
    for scale in (0.03, 0.07):  # the embedded model's bf16 floor, a 1B model's
        twin = noisy(REFERENCE, scale, seed=1)
        clean = noisy(REFERENCE, scale, seed=2)
        passed = compare_logprobs(clean, REFERENCE, bf16, twin=twin)
        assert passed.ok, passed.explain()
        assert 0.7 < passed.floor_ratios()["mean_abs"] < 1.4
        assert "precision floor (the trainer in the engine's precision vs fp32, 320 tokens)" in passed.explain()
        failed = compare_logprobs(noisy(REFERENCE, 10 * scale, seed=3), REFERENCE, bf16, twin=twin)
        assert not failed.ok and any(v.startswith("mean_abs") for v in failed.violations)


def test_a_calibrated_tolerance_needs_a_floor_and_a_pinned_bound_wins():
    from pytest_rlparity.numerics import numerics_for

    bf16 = numerics_for("bfloat16").tolerance
    with pytest.raises(ValueError, match="scaled to the model's precision floor: pass twin="):
        compare_logprobs(REFERENCE, REFERENCE, bf16)
    twin = noisy(REFERENCE, 0.03, seed=1)
    pinned = bf16.replace(mean_abs=0.001)  # a profile's [tolerance] mean_abs = 0.001
    assert compare_logprobs(noisy(REFERENCE, 0.03, seed=2), REFERENCE, pinned, twin=twin).violations[0].startswith("mean_abs")
    # A floor of zero (reduced precision that equals fp32) never makes bounds sharper than fp32's.
    exact = compare_logprobs(REFERENCE, REFERENCE, bf16, twin=REFERENCE)
    assert exact.ok and exact.tolerance.mean_abs == Tolerance().mean_abs


def test_unknown_dtypes_are_an_error_with_the_known_ones():
    from pytest_rlparity.numerics import numerics_for

    with pytest.raises(ValueError, match="no numerics for dtype 'float8'; known: bfloat16, float16, float32"):
        numerics_for("float8")
    assert numerics_for("torch.bfloat16") is numerics_for("float16")
