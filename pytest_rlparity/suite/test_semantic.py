"""Semantic layer of the built-in suite: the engine's logprobs mean what the trainer assumes.

Each case samples the built-in prompts with one sampling configuration, recomputes the
sampled tokens' logprobs in the tiny trainer under the processed distribution, and
compares. The grid covers every knob that changes the processed distribution, because
raw and processed logprobs only differ where one of them is on. A multi-turn conversation checks the
ids and loss mask a trainer builds from several engine calls.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest

from pytest_rlparity.golden import Snapshot, snapshot_from
from pytest_rlparity.layers.conversation import check_conversation, converse
from pytest_rlparity.layers.semantic import check_completions, check_scores
from pytest_rlparity.model import CORPUS, non_canonical_prompts
from pytest_rlparity.scheduling import SESSION_ENGINE_GROUP
from pytest_rlparity.settings import Case, SamplingSettings

pytestmark = [pytest.mark.semantic, pytest.mark.xdist_group(SESSION_ENGINE_GROUP)]

GRID = [
    Case("greedy", SamplingSettings(temperature=0.0, top_logprobs=5)),  # argmax; processed = raw unless penalties
    Case("temperature", SamplingSettings(temperature=0.7)),  # T != 1 alone separates raw from processed
    Case("top_k", SamplingSettings(temperature=0.7, top_k=20, top_logprobs=5)),  # the post's setting; alternatives too
    Case("top_p", SamplingSettings(temperature=0.9, top_p=0.8)),  # nucleus filtering
    Case("min_p", SamplingSettings(temperature=1.0, min_p=0.1)),  # min-p alone, at T=1
    # penalties depend on the tokens generated so far
    Case("penalties", SamplingSettings(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)),
    # every stage at once, in vLLM's order
    Case("combined", SamplingSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.1, top_logprobs=3)),
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.name)
def test_sampled_logprobs_match_trainer(case, rlparity_session, rlparity_engine, rlparity_trainer, rlparity_prompts, rlparity_tolerance, rlparity_golden):
    settings = rlparity_session.seeded(case.settings)
    completions = rlparity_engine.generate(rlparity_prompts, settings)
    check_and_record(completions, settings, rlparity_engine, rlparity_trainer, rlparity_tolerance, rlparity_golden)


def check_and_record(completions, settings, engine, trainer, tolerance, golden) -> None:
    """Semantic checks against the trainer's recompute, then the golden of the same rollouts."""
    recompute = trainer.recompute(completions, settings)
    report = check_completions(completions, recompute, settings, tolerance, tokenizer=trainer.tokenizer)
    report.raise_if_failed()
    golden.check(snapshot_from(completions, report.comparison, settings.to_dict()), engine.info)


FINISH = [
    Case("eos", SamplingSettings(temperature=1.0, max_tokens=64)),  # EOS ends generations and is scored
    Case("stop_string", SamplingSettings(temperature=1.0, max_tokens=64, stop=(" the",))),  # stop string cut from the text
    Case("stop_token", SamplingSettings(temperature=1.0, max_tokens=64)),  # stop token: the run's most frequent token
    Case("ignore_eos", SamplingSettings(temperature=1.0, max_tokens=64, ignore_eos=True)),  # EOS sampled mid-sequence, generation goes on
]
EXPECTED = {"eos": {"eos"}, "stop_string": {"stop string"}, "stop_token": {"stop token"}, "ignore_eos": {"length"}}


def most_frequent_token(engine, prompts, settings) -> int:
    """A stop token that the model will surely sample, whatever the model."""
    counts = collections.Counter(t for c in engine.generate(prompts, settings) for t in c.token_ids[:-1])
    return counts.most_common(1)[0][0]


def finish_kind(completion) -> str:
    if completion.finish_reason == "length":
        return "length"
    if isinstance(completion.stop_reason, str):
        return "stop string"
    return "stop token" if isinstance(completion.stop_reason, int) else "eos"


@pytest.mark.parametrize("case", FINISH, ids=lambda c: c.name)
def test_finish_handling(case, rlparity_session, rlparity_engine, rlparity_trainer, rlparity_prompts, rlparity_tolerance, rlparity_golden):
    settings = rlparity_session.seeded(case.settings)
    if case.name == "stop_token":
        settings = dataclasses.replace(settings, stop_token_ids=(most_frequent_token(rlparity_engine, rlparity_prompts, settings),))
    completions, settings, missing = draw_until_exercised(case, rlparity_engine, rlparity_prompts, settings)
    if missing and case.name == "stop_string":  # a model that never writes " the": a string it does write
        text = rlparity_trainer.tokenizer.decode([most_frequent_token(rlparity_engine, rlparity_prompts, settings)])
        settings = dataclasses.replace(settings, stop=(text,))
        completions, settings, missing = draw_until_exercised(case, rlparity_engine, rlparity_prompts, settings)
    if missing and case.name == "eos":  # a model that rarely ends by EOS: the prompt where EOS is likeliest
        completions, settings = forced_eos(rlparity_engine, rlparity_trainer, rlparity_prompts, settings)
        missing = EXPECTED["eos"] - {finish_kind(c) for c in completions}
    assert not missing, f"case {case.name} did not exercise {sorted(missing)}: the finish path was not checked"
    check_and_record(completions, settings, rlparity_engine, rlparity_trainer, rlparity_tolerance, rlparity_golden)


def draw_until_exercised(case, engine, prompts, settings):
    """The case's rollouts, with other seeds until they end as the case needs (the first is the golden's on CPU)."""
    first_seed = settings.seed
    for attempt in range(4):
        if attempt:
            settings = dataclasses.replace(settings, seed=first_seed + attempt * 1000)
        completions = engine.generate(prompts, settings)
        missing = EXPECTED[case.name] - {finish_kind(c) for c in completions}
        if not missing:
            break
    return completions, settings, missing


FORCED_MISS = 1e-4
"""The chance that a forced EOS case draws no EOS at all, on a clean engine."""


def forced_eos(engine, trainer, prompts, settings):
    """One-token rollouts of the prompt prefix where the trainer ranks EOS highest, sampled with a top-k that
    keeps EOS with room to spare and a temperature that flattens what it keeps, as many times as make missing EOS unlikely
    (:data:`FORCED_MISS`). Every such rollout ends by EOS or by length, and both are checked."""
    import math

    import torch

    from pytest_rlparity import sampling

    eos = trainer.tokenizer.eos_token_id
    best = None
    for prompt in prompts:
        logits = trainer.logits(prompt)
        ranks = (logits > logits[:, eos : eos + 1]).sum(dim=1)
        cut = int(torch.argmin(ranks))
        if best is None or int(ranks[cut]) < best[0]:
            best = (int(ranks[cut]), list(prompt[: cut + 1]))
    rank, prefix = best
    keep = 2 * rank + 4  # room for EOS to fall a few places in the engine's precision (Granite's scaled logits did)
    tries = []
    for temperature in (1.0, 2.0):  # vLLM allows temperatures up to 2
        forced = dataclasses.replace(settings, temperature=temperature, top_k=keep, top_p=1.0, min_p=0.0, max_tokens=1)
        p = float(sampling.processed_logprobs(trainer.logits(prefix)[-1:], forced, prefix, [])[0, eos].exp())
        tries.append((p, forced))
    p, forced = max(tries, key=lambda t: t[0])
    copies = math.ceil(math.log(FORCED_MISS) / math.log1p(-p)) if 0 < p < 1 else 1
    if not 0 < p or copies > 4096:
        pytest.skip(f"EOS ranks {rank + 1} at best after any prompt prefix (p = {p:.2g} under top_k={keep}): "
                    "the EOS finish cannot be forced on this model within 4096 one-token rollouts, so it was not checked")
    return engine.generate([prefix] * copies, forced), forced


def test_teacher_forced_scores_match_trainer(rlparity_engine, rlparity_trainer, rlparity_tolerance, rlparity_golden):
    """Logprobs of fixed text: no sampler involved, so the golden compares across engines and versions."""
    sequences = [rlparity_trainer.tokenizer(sentence).input_ids for sentence in CORPUS]
    scores = rlparity_engine.score(sequences)
    report = check_scores(
        scores, rlparity_trainer.score(sequences), rlparity_tolerance, label="teacher-forced scores of the corpus",
        twin=rlparity_trainer.score_twin(sequences),
    )
    report.raise_if_failed()
    record = Snapshot(
        sequences=[{"prompt": [], "tokens": list(s), "logprobs": list(lp)} for s, lp in zip(sequences, scores)],
        stats=report.comparison.recorded_stats(),
        sampling={"teacher_forced": True},
    )
    rlparity_golden.check(record, rlparity_engine.info)


TRANSPORT = [
    # alternatives beyond top_k have probability 0: -inf, which JSON cannot write (vLLM's server sends -9999.0)
    Case("outside_top_k", SamplingSettings(temperature=0.7, top_k=3, top_logprobs=6, max_tokens=16)),
    # confident tokens: logprobs near 0 must not be rounded on the way (T=0.25 amplifies fp32 logit noise 4x, not 20x)
    Case("confident", SamplingSettings(temperature=0.25, max_tokens=16)),
]


@pytest.mark.parametrize("case", TRANSPORT, ids=lambda c: c.name)
def test_logprobs_arrive_as_computed(case, rlparity_session, rlparity_engine, rlparity_trainer, rlparity_prompts, rlparity_tolerance):
    """Values a transport (an HTTP server's JSON, a client library) may change: -inf, tiny logprobs, full
    precision, every alternative by its own token id."""
    settings = rlparity_session.seeded(case.settings)
    completions = rlparity_engine.generate(rlparity_prompts, settings)
    if case.name == "outside_top_k":
        impossible = sum(v == float("-inf") for c in completions for step in c.top_logprobs or [] for v in step.values())
        assert impossible or any(v == -9999.0 for c in completions for s in c.top_logprobs or [] for v in s.values()), (
            "no alternative outside the top-k was reported: this case did not exercise -inf"
        )
    recompute = rlparity_trainer.recompute(completions, settings)
    check_completions(completions, recompute, settings, rlparity_tolerance, tokenizer=rlparity_trainer.tokenizer).raise_if_failed()


def test_prompt_token_ids_reach_the_engine_unchanged(rlparity_session, rlparity_engine, rlparity_trainer, rlparity_tolerance):
    """Prompts the tokenizer would spell otherwise from their text: an engine (or client) that sends text and
    lets the server tokenize again computes on other ids."""
    prompts = non_canonical_prompts(rlparity_trainer.tokenizer)
    if not prompts:
        pytest.skip("this tokenizer spells every corpus word the same from its text and from its characters")
    settings = rlparity_session.seeded(SamplingSettings(temperature=0.7, max_tokens=8))
    completions = rlparity_engine.generate(prompts, settings)
    recompute = rlparity_trainer.recompute(completions, settings)
    check_completions(completions, recompute, settings, rlparity_tolerance, tokenizer=rlparity_trainer.tokenizer).raise_if_failed()


def test_multi_turn_conversation_matches_trainer(rlparity_session, rlparity_engine, rlparity_trainer, rlparity_tolerance):
    """Three user turns and the model's answers, kept as RL stacks must keep them (every turn appended as ids):
    each prompt the engine gets is the conversation's own prefix, every sampled token carries its logprob (the
    stop token that ends a turn included), and the trainer's one forward over the whole conversation, masked
    to the sampled tokens, gives the engine's logprobs (:mod:`pytest_rlparity.layers.conversation`)."""
    tokenizer = rlparity_trainer.tokenizer
    turns = [tokenizer(CORPUS[0]).input_ids, *(tokenizer(" " + s, add_special_tokens=False).input_ids[:8] for s in CORPUS[1:3])]
    plain = rlparity_session.seeded(SamplingSettings(temperature=1.0, max_tokens=12, seed=0))
    first = converse(rlparity_engine, turns[:1], plain)
    sampled = first.ids[len(turns[0]) : -1] or first.ids[len(turns[0]) :]
    stop = collections.Counter(sampled).most_common(1)[0][0]  # sampled in the first turn: it ends that turn
    conversation = converse(rlparity_engine, turns, dataclasses.replace(plain, stop_token_ids=(stop,)))
    assert any(reason == "stop" for _, reason in conversation.ends), (
        f"no model turn ended by its stop token {stop}: this check did not exercise a stop token's logprob ({conversation.ends})"
    )
    check_conversation(conversation, rlparity_trainer, rlparity_tolerance).raise_if_failed()
