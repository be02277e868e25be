"""Semantic layer: do the engine's logprobs *mean* what the trainer assumes?

The trainer uses the engine's per-token logprobs as the behaviour policy. They must be
logprobs of the sampled token, at the right position, under the processed distribution
the sampler drew from. Each way of getting that wrong has a signature, and this module
names the signature instead of only reporting that numbers differ:

- raw instead of processed logprobs: the engine matches the trainer's *raw* distribution
  (the post's first V1 fix, ``logprobs_mode=processed_logprobs``);
- logits instead of logprobs: values above zero;
- an off-by-one between tokens and logprobs: the engine matches the trainer one position over;
- the sampled token missing from what the engine reports;
- token ids that do not round-trip (prompt echo, vocabulary range, detokenised text);
- finish handling: EOS, stop tokens and stop strings as the last token, ``length`` at max_tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..compare import Comparison, compare_logprobs, floor_summary
from ..engines.base import Completion
from ..engines.vllm_server import JSON_MINUS_INF
from ..settings import SamplingSettings, Tolerance
from . import causes
from .result import Finding, LayerResult

if TYPE_CHECKING:
    from ..trainer.recompute import Recompute


LAYER = "semantic"

DIAGNOSIS_RATIO = 10.0
"""A hypothesis (raw, shifted) is named when it fits this many times better than the aligned, processed one."""


def semantic_result(label: str, comparison: Comparison) -> LayerResult:
    return LayerResult(LAYER, label, comparison, summary="the engine's logprobs do not mean what the trainer assumes")


def check_scores(
    engine: Sequence[Sequence[float]],
    trainer: Sequence[Sequence[float]],
    tolerance: Tolerance,
    *,
    label: str,
    twin: Sequence[Sequence[float]] | None = None,
) -> LayerResult:
    """Teacher-forced logprobs of fixed sequences (the engine's prompt logprobs) against the trainer's.

    ``twin``: the same scores by the trainer in the engine's precision (``Trainer.score_twin``).
    """
    result = semantic_result(label, compare_logprobs(engine, trainer, tolerance, twin=twin))
    if not result.comparison.ok:
        result.findings.append(
            Finding(
                causes.PROMPT_LOGPROBS,
                "the engine scores fixed text differently from the trainer: check that prompt logprob t scores "
                "token t given the tokens before it, and the engine's weights, dtype and lm_head precision",
            )
        )
    return result


def check_completions(
    completions: Sequence[Completion],
    recompute: Recompute,
    settings: SamplingSettings,
    tolerance: Tolerance,
    *,
    tokenizer: Any,
) -> LayerResult:
    """Run every semantic check on completions the engine sampled with ``settings``.

    ``tokenizer`` is the trainer's Hugging Face tokenizer: it decodes tokens for the
    report and checks the engine's text and EOS handling.
    """
    vocab_size, eos_token_id = len(tokenizer), tokenizer.eos_token_id
    decode = tokenizer.decode

    def text_of(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    # A completion with more or fewer logprobs than tokens is a finding (_reported_tokens); its
    # logprobs are compared on the positions both sides have.
    scored = [min(len(c.logprobs), len(c.token_ids)) for c in completions]

    def cut(values: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
        return [v[:n] for v, n in zip(values, scored)]

    engine, processed = cut([c.logprobs for c in completions]), cut(recompute.processed)
    twin = cut(recompute.twin_processed) if recompute.twin_processed is not None else None
    comparison = compare_logprobs(
        engine, processed, tolerance, token_ids=cut([c.token_ids for c in completions]), decode=decode, twin=twin,
        sampled=True,
    )
    result = semantic_result(settings.label(), comparison)
    findings = result.findings
    findings += _reported_tokens(completions)
    findings += _reported_values(completions)
    if settings.top_logprobs:
        findings += _alternatives_reported(completions, settings.top_logprobs, vocab_size)
    findings += _token_ids(completions, vocab_size, text_of)
    findings += _finish(completions, settings, eos_token_id, text_of)
    if not comparison.ok:
        findings += _diagnose(engine, processed, cut(recompute.raw), comparison)
    if recompute.alternatives is not None and settings.top_logprobs:
        alternatives = _alternatives(completions, recompute, tolerance, decode)
        result.extra.append(alternatives)
        if not alternatives.ok:
            findings.append(Finding(causes.TOP_K_ALTERNATIVES, "the engine's reported alternatives disagree with the trainer"))
    return result


def _diagnose(
    engine: Sequence[Sequence[float]], processed: Sequence[Sequence[float]], raw: Sequence[Sequence[float]], aligned: Comparison
) -> list[Finding]:
    """Name the signature: ``engine`` against the trainer's ``processed`` and ``raw`` logprobs of the same
    tokens; each hypothesis is judged with the bounds the aligned comparison used."""
    tolerance = aligned.tolerance
    if any(lp > 1e-6 for seq in engine for lp in seq):
        return [
            Finding(
                causes.LOGPROBS_MODE,
                "the engine returned values above 0, so they are logits, not log-probabilities "
                "(logprobs_mode=raw_logits or processed_logits). Set logprobs_mode=processed_logprobs.",
            )
        ]
    if not aligned.stats.get("tokens"):
        return [Finding(causes.LOGPROB_VALUES, "no token could be compared: " + "; ".join(aligned.violations))]
    baseline = max(aligned.stats["mean_abs"], 1e-12)
    raw_fit = compare_logprobs(engine, raw, tolerance)
    if raw_fit.ok or raw_fit.stats.get("mean_abs", 0.0) * DIAGNOSIS_RATIO < baseline:
        return [
            Finding(
                causes.LOGPROBS_MODE,
                "the engine's logprobs match the trainer's RAW distribution (before penalties, temperature, "
                f"min-p, top-k, top-p; |diff| {raw_fit.stats['mean_abs']:.2g} raw vs {baseline:.2g} processed, mean offset "
                f"{aligned.stats['mean_offset']:+.3g} nats): the engine returns raw logprobs. "
                "Set the engine kwarg logprobs_mode=processed_logprobs.",
            )
        ]
    for shift, where in ((1, "one position ahead of"), (-1, "one position behind")):
        shifted = compare_logprobs(*_shift(engine, processed, shift), tolerance)
        if shifted.stats.get("tokens") and (
            shifted.ok or shifted.stats["mean_abs"] * DIAGNOSIS_RATIO < baseline
        ):
            return [
                Finding(
                    causes.OFF_BY_ONE,
                    f"the engine's logprob list is {where} its token list (it matches the trainer at "
                    f"position t{shift:+d}): tokens and logprobs are misaligned by one.",
                )
            ]
    if aligned.floor:
        return [
            Finding(
                causes.BEYOND_FLOOR,
                "the engine is further from the fp32 trainer than the model's own reduced precision explains "
                f"({floor_summary(aligned)}), and the difference is not raw-vs-processed or a shift: check the "
                "engine's lm_head precision, kernels and weights against the trainer's.",
            )
        ]
    return [
        Finding(
            causes.LOGPROB_VALUES,
            "engine and trainer disagree beyond tolerance and the difference is not raw-vs-processed or a shift: "
            "check the trainer's sampling settings, dtype and lm_head precision, and the engine's weights.",
        )
    ]


def _shift(
    engine: Sequence[Sequence[float]], trainer: Sequence[Sequence[float]], shift: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Pair engine position ``t`` with trainer position ``t + shift``."""
    left, right = [], []
    for e, t in zip(engine, trainer):
        if shift > 0:
            left.append(list(e[:-shift]) if len(e) > shift else [])
            right.append(list(t[shift:]))
        else:
            left.append(list(e[-shift:]))
            right.append(list(t[:shift]) if len(t) > -shift else [])
    return left, right


def _reported_tokens(completions: Sequence[Completion]) -> list[Finding]:
    missing, count_mismatch = [], []
    for i, c in enumerate(completions):
        if len(c.logprobs) != len(c.token_ids):
            count_mismatch.append(f"seq {i}: {len(c.token_ids)} tokens, {len(c.logprobs)} logprobs")
        for pos, tok in enumerate(c.token_ids):
            reported = c.top_logprobs[pos] if c.top_logprobs and pos < len(c.top_logprobs) else None
            if reported is not None and tok not in reported:
                missing.append(f"seq {i} pos {pos} token {tok}")
    findings = []
    if count_mismatch:
        findings.append(Finding(causes.TOKEN_COUNT, "; ".join(count_mismatch[:5])))
    if missing:
        findings.append(
            Finding(
                causes.SAMPLED_TOKEN_PRESENT,
                f"the sampled token is missing from the engine's reported logprobs at {len(missing)} position(s): "
                + ", ".join(missing[:5]),
            )
        )
    return findings


ROUNDED_DECIMALS = 6
"""Logprobs that all equal themselves rounded to this many decimals were rounded on the way: an
fp32 logprob has 7-9 significant digits, so a genuine value passes this with probability ~1e-3."""


def _reported_values(completions: Sequence[Completion]) -> list[Finding]:
    """Values a transport changed: ``-inf`` written as vLLM's JSON floor and read back as a number, or
    logprobs rounded to a few decimals (a JSON encoder with a fixed precision)."""
    values = [v for c in completions for step in (c.top_logprobs or []) for v in step.values()]
    values += [v for c in completions for v in c.logprobs]
    findings = []
    floored = [v for v in values if v == JSON_MINUS_INF]
    if floored:
        findings.append(Finding(
            causes.JSON_MINUS_INF,
            f"{len(floored)} reported logprob(s) equal {JSON_MINUS_INF}, vLLM's JSON stand-in for -inf: read values of "
            f"{JSON_MINUS_INF} or below as -inf (a token outside the top-k/top-p support has probability 0, not e^{JSON_MINUS_INF:g})",
        ))
    sampled = [v for c in completions for v in c.logprobs if math.isfinite(v) and v != 0.0]
    if len(sampled) >= 10 and all(v == round(v, ROUNDED_DECIMALS) for v in sampled):
        findings.append(Finding(
            causes.PRECISION,
            f"all {len(sampled)} sampled-token logprobs have at most {ROUNDED_DECIMALS} decimals (e.g. {sampled[0]!r}): "
            "something between the engine and the trainer rounds them; send floats at full precision",
        ))
    return findings


def _alternatives_reported(completions: Sequence[Completion], asked: int, vocab_size: int) -> list[Finding]:
    """Every position reports the ``asked`` most likely tokens (plus the sampled one), each a token of the
    vocabulary: fewer, or ids outside it, mean alternatives were keyed by decoded text (two tokens that decode
    alike collapse; text maps back to the wrong id, or none)."""
    steps = [(i, pos, step) for i, c in enumerate(completions) for pos, step in enumerate(c.top_logprobs or [])]
    short = [f"seq {i} pos {pos}: {len(step)}" for i, pos, step in steps if len(step) < asked]
    foreign = sorted({t for _, _, step in steps for t in step if not 0 <= t < vocab_size})
    problems = []
    if short:
        problems.append(f"{len(short)} position(s) report fewer than the {asked} alternatives asked for ({', '.join(short[:5])})")
    if foreign:
        problems.append(f"alternatives with token ids outside the vocabulary: {foreign[:5]}")
    if not problems:
        return []
    return [Finding(
        causes.ALTERNATIVES_BY_TEXT,
        "; ".join(problems) + ": tokens that decode to the same text collapsed into one entry, or text was mapped back to "
        "ids. Ask for token ids (vLLM's server: return_tokens_as_token_ids=true).",
    )]


def _token_ids(
    completions: Sequence[Completion], vocab_size: int, decode: Callable[[list[int]], str]
) -> list[Finding]:
    problems = []
    for i, c in enumerate(completions):
        if c.echoed_prompt_ids is not None and c.echoed_prompt_ids != c.prompt_ids:
            problems.append(f"seq {i}: the engine saw prompt ids {c.echoed_prompt_ids[:8]}..., sent {c.prompt_ids[:8]}...")
        bad = [t for t in c.token_ids if not 0 <= t < vocab_size]
        if bad:
            problems.append(f"seq {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        elif not isinstance(c.stop_reason, str):
            # A stop token's own text is not part of the output text.
            ids = c.token_ids[:-1] if isinstance(c.stop_reason, int) else c.token_ids
            text = decode(ids)
            if not _same_text(c.text, text):
                problems.append(f"seq {i}: the engine's text {c.text!r} is not the decoded token ids {text!r}")
    return [Finding(causes.TOKEN_IDS, "; ".join(problems[:5]))] if problems else []


def _same_text(engine_text: str, decoded: str) -> bool:
    """Equal, except that an incremental detokenizer holds back trailing incomplete UTF-8 bytes."""
    return decoded.startswith(engine_text) and not decoded[len(engine_text) :].strip("\ufffd")


def _finish(
    completions: Sequence[Completion],
    settings: SamplingSettings,
    eos_token_id: int | None,
    decode: Callable[[list[int]], str],
) -> list[Finding]:
    problems = []
    for i, c in enumerate(completions):
        last = c.token_ids[-1] if c.token_ids else None
        if c.finish_reason == "length":
            if len(c.token_ids) != settings.max_tokens:
                problems.append(f"seq {i}: finish 'length' after {len(c.token_ids)} of {settings.max_tokens} tokens")
        elif c.finish_reason != "stop":
            problems.append(f"seq {i}: unknown finish reason {c.finish_reason!r}")
        elif isinstance(c.stop_reason, int):
            if last != c.stop_reason:
                problems.append(f"seq {i}: stopped by token {c.stop_reason} but the last token is {last}")
        elif isinstance(c.stop_reason, str):
            if c.stop_reason not in decode(c.token_ids) or c.stop_reason in c.text:
                problems.append(f"seq {i}: stop string {c.stop_reason!r} not at the end of the tokens, or left in the text")
        elif last != eos_token_id:
            problems.append(f"seq {i}: finished by EOS but the last token is {last}, not EOS {eos_token_id}")
        if not settings.ignore_eos and eos_token_id in c.token_ids[:-1]:
            problems.append(f"seq {i}: EOS inside the completion, generation should have stopped there")
    return [Finding(causes.FINISH, "; ".join(problems[:5]))] if problems else []


def _alternatives(
    completions: Sequence[Completion], recompute: Recompute, tolerance: Tolerance, decode: Callable[[list[int]], str]
) -> Comparison:
    """Compare every reported top-k alternative, not only the sampled token: the full distribution."""
    engine, trainer, twin, ids = [], [], [], []
    twin_alternatives = recompute.twin.alternatives if recompute.twin is not None else None
    for n, (c, alts) in enumerate(zip(completions, recompute.alternatives or [])):
        for pos, (step, trainer_step) in enumerate(zip(c.top_logprobs or [], alts)):
            # ids outside the vocabulary (the trainer has no logprob for them) are a finding of their own
            tokens = sorted(t for t in step if not math.isnan(trainer_step.get(t, math.nan)))
            engine.append([step[t] for t in tokens])
            trainer.append([trainer_step[t] for t in tokens])
            if twin_alternatives is not None:
                twin.append([twin_alternatives[n][pos][t] for t in tokens])
            ids.append(tokens)
    return compare_logprobs(engine, trainer, tolerance, token_ids=ids, decode=decode, twin=twin if twin_alternatives is not None else None)
