"""Multi-turn rollouts, checked as an RL stack trains on them: one token sequence and a loss mask.

An agentic or chat rollout is several engine calls: the user's turn, the model's answer, the next
user turn, and so on. RL stacks keep it as one sequence of token ids and train on the tokens the
model sampled, with a loss mask over them. Three ways to get that wrong are reported by RL teams
again and again, and each is named here:

- **re-rendered history**: the earlier turns are sent as text again (decoded and re-tokenized, or
  passed through a chat template that strips or adds whitespace), so the engine sees other ids
  than the sequence the trainer computes on;
- **a stop token without a logprob**: the EOS or stop token that ended a turn is kept in the
  sequence and trained on, but its logprob was dropped (or it was appended after sampling);
- **a loss mask off by one** or over prompt tokens: the trainer's logprobs then belong to other
  tokens than the engine's.

:func:`converse` builds a conversation the right way (every turn appended as ids);
:func:`check_conversation` judges one, however it was built, against the trainer's single
forward over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..compare import compare_logprobs
from ..settings import SamplingSettings, Tolerance
from . import causes
from .result import Finding, LayerResult
from .semantic import semantic_result

if TYPE_CHECKING:
    from ..trainer.recompute import Trainer

Render = Callable[[list[int], Sequence[list[int]]], list[int]]
"""How a stack turns its conversation so far (the ids, and each turn's ids) into the next prompt's ids."""


def append_ids(ids: list[int], turns: Sequence[list[int]]) -> list[int]:
    """The right way: the conversation's ids as they are, earlier turns as the engine sampled them."""
    return list(ids)


@dataclass
class Conversation:
    """A multi-turn rollout as an RL stack keeps it."""

    ids: list[int] = field(default_factory=list)
    """Every token of every turn, in order: what the trainer computes on."""
    mask: list[bool] = field(default_factory=list)
    """The loss mask: ``True`` where the model sampled the token."""
    logprobs: dict[int, float] = field(default_factory=dict)
    """The engine's logprob of the token sampled at each position (positions in :attr:`ids`)."""
    sent: list[list[int]] = field(default_factory=list)
    """Per model turn, the prompt ids the stack sent."""
    seen: list[list[int] | None] = field(default_factory=list)
    """Per model turn, the prompt ids the engine reports it saw (``None`` where it does not report them)."""
    ends: list[tuple[int, str]] = field(default_factory=list)
    """Per model turn, the position of its last token and how it finished (``stop``, ``length``)."""


def converse(engine: Any, user_turns: Sequence[Sequence[int]], settings: SamplingSettings, *, render: Render = append_ids) -> Conversation:
    """Roll out a conversation: each user turn appended, then the engine's answer to everything so far.

    ``render`` builds each prompt from the conversation so far; the default appends ids, as RL stacks
    must. A stack's own rendering (a chat template over decoded history) goes here to be checked."""
    plain = SamplingSettings(max_tokens=settings.max_tokens, seed=settings.seed, stop=settings.stop,
                             stop_token_ids=settings.stop_token_ids, ignore_eos=settings.ignore_eos, top_logprobs=settings.top_logprobs)
    if settings != plain:
        raise ValueError(
            "a conversation is judged against the trainer's plain softmax over the whole sequence: sample it "
            f"with temperature 1 and no top-k/top-p/min-p or penalties (got {settings.label()})"
        )
    conversation = Conversation()
    turns: list[list[int]] = []
    for user in user_turns:
        conversation.ids += list(user)
        conversation.mask += [False] * len(user)
        turns.append(list(user))
        prompt = render(conversation.ids, turns)
        completion = engine.generate([prompt], settings)[0]
        conversation.sent.append(prompt)
        conversation.seen.append(completion.echoed_prompt_ids)
        start = len(conversation.ids)
        for k, logprob in enumerate(completion.logprobs[: len(completion.token_ids)]):
            conversation.logprobs[start + k] = logprob
        conversation.ids += completion.token_ids
        conversation.mask += [True] * len(completion.token_ids)
        turns.append(list(completion.token_ids))
        if completion.token_ids:
            conversation.ends.append((len(conversation.ids) - 1, completion.finish_reason))
    return conversation


def check_conversation(
    conversation: Conversation,
    trainer: Trainer,
    tolerance: Tolerance,
    *,
    mask: Sequence[bool] | None = None,
    label: str = "multi-turn conversation",
) -> LayerResult:
    """The trainer's logprobs of the conversation (one forward over all of it, as a trainer computes them) at
    the positions the loss mask selects, against the engine's logprobs of the tokens it sampled there.

    ``mask``: the stack's own loss mask (default: the conversation's). Findings name what differs: a
    prompt the engine got that is not the conversation's own prefix (re-rendered history), ids the
    engine reports other than those sent, a sampled token without a logprob (a stop token's, most
    often), and a mask that selects other positions than the sampled ones."""
    mask = list(conversation.mask if mask is None else mask)
    sampled = conversation.mask
    findings = _history(conversation) + _transport(conversation) + _stop_logprobs(conversation)
    if mask != sampled:
        wrong = [p for p, (m, s) in enumerate(zip(mask, sampled)) if m != s] + list(range(min(len(mask), len(sampled)), max(len(mask), len(sampled))))
        shifted = len(mask) == len(sampled) and (mask[1:] == sampled[:-1] or mask[:-1] == sampled[1:])
        findings.append(
            Finding(
                causes.LOSS_MASK,
                f"the loss mask selects {sum(mask)} positions where the model sampled {sum(sampled)}; they differ at "
                f"{len(wrong)} position(s), first {wrong[:5]}" + (" (the mask is shifted by one)" if shifted else "")
                + ": the trainer's logprobs there belong to other tokens than the engine's",
            )
        )
    positions = [p for p in range(1, len(conversation.ids)) if p < len(mask) and mask[p]]
    scores = trainer.score([conversation.ids])[0]  # scores[p - 1] is the logprob of ids[p]
    twin = trainer.score_twin([conversation.ids])
    engine = [[conversation.logprobs.get(p, float("nan")) for p in positions]]
    comparison = compare_logprobs(
        engine, [[scores[p - 1] for p in positions]], tolerance,
        token_ids=[[conversation.ids[p] for p in positions]], decode=trainer.tokenizer.decode,
        twin=[[twin[0][p - 1] for p in positions]] if twin is not None else None, sampled=True,
    )
    result = semantic_result(label, comparison)
    result.findings += findings
    if not comparison.ok and not findings:
        result.findings.append(Finding(causes.LOGPROB_VALUES, "the engine's logprobs of the sampled tokens differ from the trainer's forward over the whole conversation"))
    return result


def _history(conversation: Conversation) -> list[Finding]:
    """Each prompt sent must be the conversation's own prefix, id for id."""
    for turn, prompt in enumerate(conversation.sent):
        own = conversation.ids[: len(prompt)]
        if prompt != own:
            at = next((p for p, (a, b) in enumerate(zip(prompt, own)) if a != b), min(len(prompt), len(own)))
            return [
                Finding(
                    causes.RERENDERED_HISTORY,
                    f"model turn {turn + 1} was sent {len(prompt)} ids that differ from the conversation's own from position "
                    f"{at} on ({prompt[at:at + 4]} sent, {own[at:at + 4]} in the conversation): the history was rendered "
                    "again instead of appended as the ids the engine sampled",
                )
            ]
    return []


def _transport(conversation: Conversation) -> list[Finding]:
    """Where the engine reports the prompt it saw, it must be the one sent."""
    for turn, (sent, seen) in enumerate(zip(conversation.sent, conversation.seen)):
        if seen is not None and list(seen) != sent:
            return [Finding(causes.TOKEN_IDS, f"model turn {turn + 1}: the engine saw other prompt ids than were sent")]
    return []


def _stop_logprobs(conversation: Conversation) -> list[Finding]:
    """Every sampled token carries the engine's logprob, the one that ended a turn included."""
    missing = [p for p, m in enumerate(conversation.mask) if m and p not in conversation.logprobs]
    if not missing:
        return []
    stops = [p for p, reason in conversation.ends if reason == "stop" and p in missing]
    what = f"{len(stops)} stop token(s) that ended a turn" if stops else f"{len(missing)} sampled token(s)"
    return [
        Finding(
            causes.TOKEN_COUNT,
            f"{what} have no logprob from the engine (positions {missing[:5]}): a token in the loss mask without the "
            "engine's logprob is trained against a made-up behaviour policy; keep the logprob of the token that ended "
            "the turn, or mask out a token appended after sampling",
        )
    ]
