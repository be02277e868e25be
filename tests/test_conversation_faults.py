"""The multi-turn check passes a conversation built as RL stacks must build it, and names each fault RL
teams report: re-rendered history, a stop token without its logprob, a loss mask off by one.

On the transformers reference engine (a real model, real sampling) for speed; the built-in suite runs
the clean conversation on vLLM (``test_semantic.py::test_multi_turn_conversation_matches_trainer``).
"""

from __future__ import annotations

import collections
import dataclasses

import pytest

from pytest_rlparity.engines.faults import FaultyEngine
from pytest_rlparity.layers.conversation import check_conversation, converse
from pytest_rlparity.model import CORPUS
from pytest_rlparity.settings import SamplingSettings, Tolerance

PLAIN = SamplingSettings(temperature=1.0, max_tokens=10, seed=0)


@pytest.fixture(scope="module")
def user_turns(trainer):
    first = trainer.tokenizer(CORPUS[0]).input_ids
    return [first, *(trainer.tokenizer(" " + s, add_special_tokens=False).input_ids[:8] for s in CORPUS[1:3])]


@pytest.fixture(scope="module")
def stopping(hf_engine, user_turns):
    """Plain sampling that ends the first model turn, at least, by a stop token: one it samples there anyway."""
    return dataclasses.replace(PLAIN, stop_token_ids=(sampled_in_first_turn(hf_engine, user_turns),))


def sampled_in_first_turn(engine, user_turns) -> int:
    conversation = converse(engine, user_turns[:1], PLAIN)
    first = conversation.ids[len(user_turns[0]) : -1]
    return collections.Counter(first).most_common(1)[0][0]


def causes(result) -> list[str]:
    return [f.cause for f in result.findings]


def test_a_conversation_appended_as_ids_passes_with_its_stop_tokens(hf_engine, trainer, user_turns, stopping):
    conversation = converse(hf_engine, user_turns, stopping)
    assert any(reason == "stop" for _, reason in conversation.ends), conversation.ends
    result = check_conversation(conversation, trainer, Tolerance())
    assert result.ok, result.message()
    assert result.comparison.stats["tokens"] == sum(conversation.mask) > 10


def test_history_rendered_again_from_text_is_named(hf_engine, trainer, user_turns):
    """A template that strips each turn's text and joins them with spaces, as chat templates do."""
    tokenizer = trainer.tokenizer

    def rerender(ids, turns):
        return tokenizer(" ".join(tokenizer.decode(t, skip_special_tokens=True).strip() for t in turns)).input_ids

    result = check_conversation(converse(hf_engine, user_turns, PLAIN, render=rerender), trainer, Tolerance())
    assert causes(result)[0] == "re-rendered history", result.message()
    assert "the history was rendered again" in result.findings[0].message


def test_a_stop_token_without_its_logprob_is_named(hf_engine, trainer, user_turns, stopping):
    conversation = converse(FaultyEngine(hf_engine, drop_last_logprob=True), user_turns, stopping)
    result = check_conversation(conversation, trainer, Tolerance())
    assert causes(result) == ["token/logprob count"], result.message()
    assert "stop token(s) that ended a turn have no logprob" in result.findings[0].message


@pytest.mark.parametrize("shift", [1, -1])
def test_a_loss_mask_off_by_one_is_named_and_fails_the_logprobs(hf_engine, trainer, user_turns, shift):
    conversation = converse(hf_engine, user_turns, PLAIN)
    mask = conversation.mask
    shifted = [False] + mask[:-1] if shift == 1 else mask[1:] + [False]
    result = check_conversation(conversation, trainer, Tolerance(), mask=shifted)
    assert causes(result) == ["loss mask"], result.message()
    assert "(the mask is shifted by one)" in result.findings[0].message and not result.comparison.ok


def test_truncated_sampling_is_refused_with_the_reason(hf_engine, user_turns):
    with pytest.raises(ValueError, match="temperature 1 and no top-k"):
        converse(hf_engine, user_turns, SamplingSettings(temperature=0.7, max_tokens=4))
