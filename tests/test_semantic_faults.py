"""Every semantic check fails on the fault it exists to catch, and passes on a clean engine.

These run on the transformers reference engine (a real model, real sampling) so that
they are fast; tests/test_vllm_cpu.py repeats the headline faults on real vLLM.
"""

from __future__ import annotations

import dataclasses

import pytest

from pytest_rlparity.engines.base import Completion
from pytest_rlparity.engines.faults import FaultyEngine
from pytest_rlparity.engines.hf import HFEngine
from pytest_rlparity.errors import ParityError
from pytest_rlparity.layers.semantic import check_completions, check_scores
from pytest_rlparity.settings import SamplingSettings, Tolerance

SETTINGS = SamplingSettings(temperature=0.7, top_k=20, top_logprobs=3, max_tokens=16)


def run_check(engine, trainer, prompts, settings=SETTINGS, tolerance=None):
    completions = engine.generate(prompts, settings)
    recompute = trainer.recompute(completions, settings)
    return check_completions(completions, recompute, settings, tolerance or Tolerance(), tokenizer=trainer.tokenizer)


def causes(report) -> list[str]:
    return [f.cause for f in report.findings]


@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS,
        SamplingSettings(temperature=0.0, max_tokens=16),
        SamplingSettings(temperature=0.9, top_p=0.8, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.2, max_tokens=16),
    ],
    ids=lambda s: s.label(),
)
def test_clean_engine_passes(hf_engine, trainer, prompts, settings):
    report = run_check(hf_engine, trainer, prompts, settings)
    assert report.ok, report.message()
    assert report.comparison.stats["tokens"] > 40


def test_raw_logprobs_are_diagnosed_and_name_logprobs_mode(tiny_model, trainer, prompts):
    raw_engine = HFEngine(str(tiny_model), {"logprobs_mode": "raw_logprobs"})
    report = run_check(raw_engine, trainer, prompts)
    assert causes(report)[0] == "logprobs_mode"
    with pytest.raises(ParityError, match="logprobs_mode=processed_logprobs") as info:
        report.raise_if_failed()
    assert info.value.layer == "semantic" and "RAW" in str(info.value)


@pytest.mark.parametrize("shift", [1, -1])
def test_off_by_one_is_named(hf_engine, trainer, prompts, shift):
    report = run_check(FaultyEngine(hf_engine, shift_logprobs=shift), trainer, prompts)
    assert "off-by-one" in causes(report), report.message()


def test_missing_sampled_token_is_caught(hf_engine, trainer, prompts):
    report = run_check(FaultyEngine(hf_engine, drop_sampled_from_top=True), trainer, prompts)
    assert "sampled token present" in causes(report)


def test_a_logprob_list_shorter_than_its_tokens_is_named_not_an_exception(hf_engine, trainer, prompts):
    report = run_check(FaultyEngine(hf_engine, drop_last_logprob=True), trainer, prompts)
    assert causes(report) == ["token/logprob count"], report.message()
    assert report.comparison.ok  # the positions both sides have still agree


def test_logits_instead_of_logprobs_are_named(hf_engine, trainer, prompts):
    report = run_check(FaultyEngine(hf_engine, logprob_offset=20.0), trainer, prompts)
    assert causes(report) == ["logprobs_mode"] and "logits" in report.findings[0].message


def test_small_bias_fails_without_a_false_diagnosis(hf_engine, trainer, prompts):
    report = run_check(FaultyEngine(hf_engine, logprob_offset=-0.01), trainer, prompts)
    assert causes(report) == ["logprob values"]


def test_text_that_does_not_decode_from_the_ids_is_caught(hf_engine, trainer, prompts):
    report = run_check(FaultyEngine(hf_engine, retokenize_text=True), trainer, prompts)
    assert "token ids round-trip" in causes(report)


def test_finish_handling_faults(hf_engine, trainer, prompts):
    settings = dataclasses.replace(SETTINGS, top_logprobs=0)
    good = hf_engine.generate(prompts[:1], settings)[0]
    eos = trainer.tokenizer.eos_token_id
    wrong_eos = dataclasses.replace(good, finish_reason="stop", stop_reason=None)  # last token is not EOS
    short = dataclasses.replace(good, token_ids=good.token_ids[:-1], logprobs=good.logprobs[:-1], top_logprobs=None)
    inner_eos = dataclasses.replace(good, token_ids=[eos, *good.token_ids[1:]])
    for bad in (wrong_eos, short, inner_eos):
        recompute = trainer.recompute([bad], settings)
        report = check_completions([bad], recompute, settings, Tolerance(max_abs=None, mean_abs=None, mean_offset=None, k3_kl=None, prob_diff_mean=None), tokenizer=trainer.tokenizer)
        assert "finish handling" in causes(report), bad


def test_prompt_echo_and_vocabulary_range(hf_engine, trainer, prompts):
    settings = dataclasses.replace(SETTINGS, top_logprobs=0)
    good = hf_engine.generate(prompts[:1], settings)[0]
    bad_echo = dataclasses.replace(good, echoed_prompt_ids=good.prompt_ids[1:])
    out_of_vocab = Completion(good.prompt_ids, [len(trainer.tokenizer) + 3], [-1.0], None, "", "length", None, None)
    for bad, expected in ((bad_echo, "saw prompt ids"), (out_of_vocab, "outside the vocabulary")):
        recompute = trainer.recompute([bad], dataclasses.replace(settings, max_tokens=len(bad.token_ids)))
        report = check_completions([bad], recompute, dataclasses.replace(settings, max_tokens=len(bad.token_ids)), Tolerance(), tokenizer=trainer.tokenizer)
        assert any(expected in f.message for f in report.findings), report.message()


def test_disagreeing_alternatives_are_caught(hf_engine, trainer, prompts):
    class SkewedTop(FaultyEngine):
        def _corrupt(self, c):
            top = [{t: (lp if t == tok else lp - 0.5) for t, lp in step.items()} for tok, step in zip(c.token_ids, c.top_logprobs)]
            return dataclasses.replace(c, top_logprobs=top)

    report = run_check(SkewedTop(hf_engine), trainer, prompts)
    assert causes(report) == ["top-k alternatives"]


def test_teacher_forced_scores_one_position_off_fail_as_prompt_logprobs(hf_engine, trainer, prompts):
    sequences = [p + p[1:] for p in prompts]
    scores = hf_engine.score(sequences)
    assert check_scores(scores, trainer.score(sequences), Tolerance(), label="scores").ok
    shifted = [s[1:] + s[:1] for s in scores]  # logprob t scores token t+1
    report = check_scores(shifted, trainer.score(sequences), Tolerance(), label="scores")
    assert causes(report) == ["prompt logprobs"]
    with pytest.raises(ParityError, match=r"\[semantic\] scores: .*\n  - prompt logprobs: the engine scores fixed text differently"):
        report.raise_if_failed()
