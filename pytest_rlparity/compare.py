"""Numeric comparison of two sets of per-token logprobs, with tolerances and readable failures.

This is the assertion API for custom parity tests::

    from pytest_rlparity import assert_logprobs_close, Tolerance

    assert_logprobs_close(engine_lps, trainer_lps, Tolerance(max_abs=1e-3),
                          token_ids=tokens, decode=tokenizer.decode)

Inputs are ragged: one sequence of logprobs per completion. On failure the message
shows which bounds broke, the summary statistics, and a table of the worst tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ParityError
from .files import jsonable
from .frameworks import framework_metrics
from .layers import CUSTOM
from .metrics import mismatch_stats
from .checks import CheckEntry, publish
from .settings import Tolerance, floor_scale

Ragged = Sequence[Sequence[float]]

BOUNDS = ("max_abs", "mean_abs", "mean_offset", "k3_kl", "prob_diff_mean")
"""Statistics that are bounded (by the tolerance field of the same name); the others are reported only."""


@dataclass(frozen=True)
class TokenRow:
    """One token of a comparison, located by sequence and position."""

    sequence: int
    position: int
    token_id: int | None
    token: str
    engine: float
    trainer: float

    @property
    def diff(self) -> float:
        return self.engine - self.trainer


@dataclass
class Comparison:
    """The outcome of :func:`compare_logprobs`: statistics, broken bounds, worst tokens."""

    stats: dict[str, float]
    tolerance: Tolerance
    violations: list[str] = field(default_factory=list)
    worst: list[TokenRow] = field(default_factory=list)
    out_of_support: list[TokenRow] = field(default_factory=list)
    not_a_number: list[TokenRow] = field(default_factory=list)
    impossible: list[TokenRow] = field(default_factory=list)
    """Sampled tokens the engine gives probability 0 (``sampled=True``): it cannot have drawn them so."""
    pairs: tuple[Sequence[float], Sequence[float]] = ((), ())
    """Every finite (engine, trainer) pair compared, in order: what the plots show."""
    floor: dict[str, float] | None = None
    """The precision floor the bounds were scaled to (trainer in the engine's precision vs fp32)."""
    factors: dict[str, float] = field(default_factory=dict)
    """The floor factor of each calibrated bound."""

    def floor_ratios(self, stats: Sequence[str] | None = None) -> dict[str, float]:
        """Each of ``stats`` (default: the calibrated ones, which the factors bound) as a multiple of its floor."""
        if not self.floor:
            return {}
        ratios = {}
        for stat in self.factors if stats is None else stats:
            if stat == "out_of_support":
                continue
            scale = floor_scale(stat, self.floor)
            ratios[stat] = abs(self.stats.get(stat, 0.0)) / scale if scale > 0 else 0.0
        return ratios

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def empty(self) -> bool:
        """No token on either side: the comparison checked nothing (which fails it)."""
        return not (self.stats.get("tokens") or self.out_of_support or self.not_a_number or self.impossible)

    def recorded_stats(self) -> dict[str, float]:
        """The statistics a golden keeps: this comparison's, and with a floor, the floor's and each ratio to it."""
        stats = dict(self.stats)
        if self.floor:
            stats.update({f"floor_{k}": v for k, v in self.floor.items() if k != "tokens"})
            stats.update({f"floor_ratio_{k}": v for k, v in self.floor_ratios().items()})
        return stats

    def check_entry(self, label: str, layer: str, findings: Sequence[Any] = ()) -> CheckEntry:
        """This comparison as a check in the run's report (``findings``: what a layer check named)."""
        return {
            "kind": "comparison",
            "label": label,
            "layer": layer,
            "verdict": "fail" if findings or not self.ok else "pass",
            "stats": jsonable(self.stats),
            "tolerance": jsonable(self.tolerance.to_dict()),
            "violations": list(self.violations),
            "findings": [{"cause": str(f.cause), "message": f.message} for f in findings],
            "frameworks": jsonable(framework_metrics(*self.pairs)),
            **(
                {"floor": jsonable(self.floor), "floor_ratios": jsonable(self.floor_ratios()), "floor_factors": self.factors}
                if self.floor
                else {}
            ),
        }

    def explain(self, title: str = "engine vs trainer", limit: int = 10) -> str:
        """A multi-line, human-readable account: verdict, statistics, worst tokens."""
        verdict = "within tolerance" if self.ok else "OUT OF TOLERANCE: " + "; ".join(self.violations)
        lines = [f"{title}: {verdict}", stats_table(self.stats, self.tolerance)]
        if self.floor:
            lines.append(floor_line(self))
        if self.worst:
            lines.append(f"worst {min(limit, len(self.worst))} of {self.stats.get('tokens', 0)} tokens by |engine - trainer|:")
            lines.append(token_table(self.worst[:limit]))
        if self.out_of_support:
            lines.append(
                f"{len(self.out_of_support)} sampled token(s) have probability 0 on one side "
                "(outside the other's top-k/top-p/min-p support):"
            )
            lines.append(token_table(self.out_of_support[:limit]))
        if self.not_a_number:
            lines.append(f"{len(self.not_a_number)} token(s) with NaN logprobs:")
            lines.append(token_table(self.not_a_number[:limit]))
        if self.impossible:
            lines.append(f"{len(self.impossible)} sampled token(s) the engine gives probability 0 (logprob -inf):")
            lines.append(token_table(self.impossible[:limit]))
        return "\n".join(lines)


def compare_logprobs(
    engine: Ragged,
    trainer: Ragged,
    tolerance: Tolerance | None = None,
    *,
    token_ids: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    twin: Ragged | None = None,
    floor_stats: dict[str, float] | None = None,
    sampled: bool = False,
    worst: int = 10,
) -> Comparison:
    """Compare per-token logprobs sequence by sequence; never raises on a mismatch.

    ``twin`` holds the trainer's logprobs of the same tokens in the engine's precision
    (``Recompute.twin_processed``): a calibrated tolerance scales its bounds to how far those are
    from ``trainer``. Where ``trainer`` is not the fp32 trainer (two engine paths compared),
    pass ``floor_stats`` (:func:`precision_floor` of the twin against the fp32 trainer)
    instead. One of them is required for a calibrated tolerance; both are ignored otherwise.

    ``sampled``: ``engine`` holds the logprobs of tokens the engine itself sampled, so a ``-inf`` there is
    impossible (a NaN or vLLM's JSON ``-9999`` turned into ``-inf`` on the way, or another distribution's
    logprobs) and fails, where elsewhere it marks a token outside one side's top-k/top-p support.
    """
    tolerance = tolerance or Tolerance()
    if len(engine) != len(trainer):
        raise ValueError(f"{len(engine)} engine sequences vs {len(trainer)} trainer sequences")
    factors: dict[str, float] = {}
    if tolerance.calibrated:
        if twin is None and floor_stats is None:
            raise ValueError(
                "this tolerance is scaled to the model's precision floor: pass twin=, the trainer's logprobs of the "
                "same tokens in the engine's precision (Recompute.twin_processed of a trainer with a precision twin), "
                "or give absolute bounds"
            )
        if floor_stats is None:
            floor_stats = precision_floor(twin, trainer)
        factors = dict(tolerance.floor_factors)
        tolerance = tolerance.against_floor(floor_stats)
    finite_e: list[float] = []
    finite_t: list[float] = []
    rows: list[TokenRow] = []
    outside: list[TokenRow] = []
    nans: list[TokenRow] = []
    impossible: list[TokenRow] = []
    for s, (eng, tr) in enumerate(zip(engine, trainer)):
        if len(eng) != len(tr):
            raise ValueError(
                f"sequence {s}: {len(eng)} engine logprobs vs {len(tr)} trainer logprobs; "
                "both sides must score the same tokens"
            )
        ids = token_ids[s] if token_ids is not None else None
        for pos, (e, t) in enumerate(zip(eng, tr)):
            tid = int(ids[pos]) if ids is not None else None
            row = TokenRow(s, pos, tid, _token_text(tid, decode), float(e), float(t))
            if sampled and row.engine == -math.inf:
                impossible.append(row)
            elif row.engine == row.trainer == -math.inf:
                continue  # both sides agree the token is impossible
            if math.isnan(row.engine) or math.isnan(row.trainer):
                nans.append(row)
            elif math.isinf(row.engine) or math.isinf(row.trainer):
                outside.append(row)
            else:
                finite_e.append(row.engine)
                finite_t.append(row.trainer)
                rows.append(row)
    stats = mismatch_stats(finite_e, finite_t)
    stats["out_of_support"] = len(outside)
    stats["not_a_number"] = len(nans)
    if sampled:
        stats["engine_impossible"] = len(impossible)
    rows.sort(key=lambda r: abs(r.diff), reverse=True)
    comparison = Comparison(
        stats, tolerance, [], rows[:worst], outside, nans, impossible, (finite_e, finite_t), floor_stats if factors else None, factors
    )
    comparison.violations = _violations(comparison, tolerance, rows)
    return comparison


def precision_floor(twin: Ragged, trainer: Ragged) -> dict[str, float]:
    """The precision floor: how far the trainer in the engine's precision (its twin) is from the trainer
    in fp32, on the same tokens, as mismatch statistics."""
    if len(twin) != len(trainer) or any(len(f) != len(t) for f, t in zip(twin, trainer)):
        raise ValueError("the precision twin must hold one logprob per trainer logprob")
    low, full, outside, total, nans = [], [], 0, 0, 0
    for f_seq, t_seq in zip(twin, trainer):
        for f, t in zip(f_seq, t_seq):
            if (f == t == -math.inf) or math.isnan(t):
                continue  # a NaN on the fp32 side is a bad token id, which the comparison itself reports
            if math.isnan(f):
                nans += 1
                continue
            total += 1
            if math.isinf(f) or math.isinf(t):
                outside += 1
            else:
                low.append(float(f))
                full.append(float(t))
    stats = mismatch_stats(low, full)
    stats["out_of_support_share"] = outside / total if total else 0.0
    stats["not_a_number"] = nans
    return stats


def assert_logprobs_close(
    engine: Ragged,
    trainer: Ragged,
    tolerance: Tolerance | None = None,
    *,
    token_ids: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    twin: Ragged | None = None,
    title: str = "engine vs trainer",
    layer: str = CUSTOM,
    sampled: bool = True,
) -> Comparison:
    """Assert that two sets of per-token logprobs agree; raise :class:`ParityError` with a table if not.

    :param engine: the engine's logprob of each sampled token, one list per completion.
    :param trainer: the trainer's recompute of the same tokens (``Recompute.processed``).
    :param tolerance: the bounds, e.g. ``rlparity_tolerance`` or ``Tolerance(max_abs=1e-3)``; a
        reduced-precision tolerance is scaled to the precision floor that ``twin`` gives.
    :param token_ids: the sampled token ids, to name the worst tokens in the failure table.
    :param decode: ``tokenizer.decode``, to show the worst tokens as text.
    :param twin: the trainer's logprobs in the engine's precision (``Recompute.twin_processed``);
        needed when the tolerance is calibrated (bf16 engines).
    :param title: the first words of the failure message and the report entry.
    :param layer: the report layer this check belongs to.
    :param sampled: ``engine`` holds logprobs of the tokens the engine sampled, so a ``-inf`` there fails
        (pass ``False`` for other tokens, e.g. reported alternatives, where ``-inf`` means outside the support).

    Example::

        recomputed = rlparity_trainer.recompute(completions, settings)
        assert_logprobs_close([c.logprobs for c in completions], recomputed.processed, rlparity_tolerance,
                              twin=recomputed.twin_processed, token_ids=[c.token_ids for c in completions])
    """
    __tracebackhide__ = True
    comparison = compare_logprobs(engine, trainer, tolerance, token_ids=token_ids, decode=decode, twin=twin, sampled=sampled)
    publish(comparison.check_entry(title, layer), comparison)
    if not comparison.ok:
        raise ParityError(comparison.explain(title), layer=layer)
    return comparison


def _violations(comparison: Comparison, tolerance: Tolerance, rows: Sequence[TokenRow]) -> list[str]:
    stats = comparison.stats
    if comparison.empty:
        return ["no token to compare: an empty comparison checks nothing"]
    found = []
    if comparison.not_a_number:
        found.append(f"{len(comparison.not_a_number)} NaN logprob(s)")
    if comparison.impossible:
        found.append(
            f"{len(comparison.impossible)} sampled token(s) with engine logprob -inf: the engine gives probability 0 to "
            "a token it sampled (a NaN, or vLLM's JSON -9999, read as -inf on the way?)"
        )
    total = len(comparison.out_of_support) + int(stats.get("tokens", 0))
    if comparison.out_of_support and len(comparison.out_of_support) > tolerance.max_out_of_support * total:
        found.append(
            f"{len(comparison.out_of_support)} of {total} token(s) outside the support "
            f"(> {tolerance.max_out_of_support:.1%} allowed)"
        )
    if not stats.get("tokens"):
        return found
    for stat in BOUNDS:
        bound = getattr(tolerance, stat)
        if bound is None:
            continue
        value = abs(stats[stat])
        if stat == "max_abs" and tolerance.rtol:
            if any(abs(r.diff) > bound + tolerance.rtol * abs(r.trainer) for r in rows):
                found.append(f"max_abs {value:.3g} > {bound:g} + {tolerance.rtol:g}*|trainer|")
        elif value > bound:
            found.append(f"{stat} {value:.3g} > {bound:g}")
    return found


def stats_table(stats: dict[str, float], tolerance: Tolerance | None = None) -> str:
    """Statistics with their bounds, one per line, failing ones marked."""
    lines = []
    for name, value in stats.items():
        bound = getattr(tolerance, name, None) if tolerance else None
        mark = ""
        if isinstance(bound, (int, float)) and not isinstance(bound, bool):
            mark = f"  (bound {bound:g})" + ("  <-- FAIL" if abs(value) > bound else "")
        shown = f"{value:d}" if isinstance(value, int) else f"{value:.4g}"
        lines.append(f"  {name:<17}{shown:>12}{mark}")
    return "\n".join(lines)


def floor_summary(comparison: Comparison) -> str:
    """``mean_abs 2.3x its floor (bound 4x), k3_kl 9.1x (bound 12x)``: the ratios that matter in a message."""
    ratios = comparison.floor_ratios()
    return ", ".join(f"{s} {r:.2g}x its floor (bound {comparison.factors[s]:g}x)" for s, r in ratios.items() if s in ("mean_abs", "k3_kl", "mean_offset"))


def floor_line(comparison: Comparison) -> str:
    """``precision floor (...): mean_abs 0.031 -> engine 1.1x (bound 4x), ...``."""
    floor = comparison.floor or {}
    ratios = comparison.floor_ratios()
    parts = [f"{s} {floor_scale(s, floor):.3g} -> {ratios[s]:.2f}x (bound {comparison.factors[s]:g}x)" for s in ratios]
    outside = floor.get("out_of_support_share", 0.0)
    return (
        f"  precision floor (the trainer in the engine's precision vs fp32, {int(floor.get('tokens', 0))} tokens): "
        + "; ".join(parts)
        + f"; outside the support {outside:.1%}"
    )


def token_table(rows: Sequence[TokenRow]) -> str:
    header = f"  {'seq':>4} {'pos':>4}  {'token':<14}{'engine':>12}{'trainer':>12}{'diff':>11}"
    body = [
        f"  {r.sequence:>4} {r.position:>4}  {r.token:<14.14}{r.engine:>12.5g}{r.trainer:>12.5g}{_signed(r.diff):>11}"
        for r in rows
    ]
    return "\n".join([header, *body])


def _signed(value: float) -> str:
    return f"{value:+.2e}" if math.isfinite(value) else str(value)


def _token_text(token_id: int | None, decode: Callable[[list[int]], str] | None) -> str:
    if token_id is None:
        return ""
    if decode is None:
        return f"#{token_id}"
    return f"{decode([token_id])!r}#{token_id}"
