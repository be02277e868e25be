"""The RL frameworks' own train/inference mismatch metrics, from the same token arrays as every check.

A team running verl reads ``rollout_corr/kl``, one running NeMo-RL reads ``token_mult_prob_error``:
the report gives each framework's number with the threshold that framework documents, so a
result reads in the language of the stack it guards. Formulas, with ``Δ = lp_trainer - lp_rollout``
per token and ``r = exp(Δ)``:

=================  ===================================  ==============================  =================
framework          metric                               formula                         documented limit
=================  ===================================  ==============================  =================
verl               ``rollout_corr/kl``                  mean(-Δ)                        warn at abs > 0.1
verl               ``rollout_corr/k3_kl``               mean(r - 1 - Δ)                 (reported)
verl               ``rollout_corr/chi2_token``          mean(r²) - 1                    (reported)
verl               ``rollout_corr/ess``                 (Σr)² / (N Σr²)                 warn below 0.3
verl               ``rollout_probs_diff_mean``          mean(abs(exp(lp_r) - exp(lp_t)))  above 0.01
NeMo-RL            ``token_mult_prob_error``            mean(exp(abs(Δ)))               above 1.05
prime-rl           mismatch KL                          mean(r - 1 - Δ)                 above 0.015
slime              ``train_rollout_logprob_abs_diff``   mean(abs(Δ))                    above 0.1
TRL                ``sampling_logp_difference/mean``    mean(abs(Δ))                    (logged, no limit)
TRL                ``sampling_logp_difference/max``     max(abs(Δ))                     (logged, no limit)
=================  ===================================  ==============================  =================

These limits are the frameworks' alarms for a training run, far looser than this plugin's fp32
bounds (fp32 parity is ~1e-6): a bug can pass the frameworks' limits and still fail here, which
is the point of checking before training. In bf16 they are not always looser: a clean bf16
engine of the embedded model against the fp32 trainer read 1.053 on NeMo-RL's
``token_mult_prob_error`` (H100, vLLM 0.26.0), above its 1.05, while every check passed within
the model's precision floor. The table says what each framework would say; it never fails a test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from . import metrics


@dataclass(frozen=True)
class FrameworkMetric:
    """One framework's metric and the value it raises an alarm at."""

    framework: str
    name: str
    compute: Callable[[np.ndarray, np.ndarray], float]
    """``(rollout, trainer)`` logprobs of the same tokens -> the value."""
    limit: float | None = None
    """The documented alarm threshold; ``None`` where the framework logs the metric without one."""
    above: bool = True
    """Whether values above ``limit`` are alarming (``False``: below, as for ESS)."""
    absolute: bool = False
    """Whether the limit applies to the absolute value (verl's KL can be negative)."""

    def alarming(self, value: float) -> bool:
        if self.limit is None or not math.isfinite(value):
            return not math.isfinite(value)
        judged = abs(value) if self.absolute else value
        return judged > self.limit if self.above else judged < self.limit

    @property
    def limit_text(self) -> str:
        if self.limit is None:
            return "-"
        return f"{'|x| ' if self.absolute else ''}{'>' if self.above else '<'} {self.limit:g}"


def _ratios(rollout: np.ndarray, trainer: np.ndarray) -> np.ndarray:
    return np.exp(metrics.log_ratio(rollout, trainer))


def _abs_diff(rollout: np.ndarray, trainer: np.ndarray) -> np.ndarray:
    return np.abs(metrics.log_ratio(rollout, trainer))


FRAMEWORK_METRICS: tuple[FrameworkMetric, ...] = (
    FrameworkMetric("verl", "rollout_corr/kl", metrics.k1, 0.1, absolute=True),
    FrameworkMetric("verl", "rollout_corr/k3_kl", metrics.k3),
    FrameworkMetric("verl", "rollout_corr/chi2_token", lambda a, b: metrics.chi2(_ratios(a, b))),
    FrameworkMetric("verl", "rollout_corr/ess", lambda a, b: metrics.ess(_ratios(a, b)), 0.3, above=False),
    FrameworkMetric("verl", "rollout_probs_diff_mean", metrics.prob_diff_mean, 0.01),
    FrameworkMetric("NeMo-RL", "token_mult_prob_error", lambda a, b: float(np.mean(np.exp(_abs_diff(a, b)))), 1.05),
    FrameworkMetric("prime-rl", "mismatch_kl", metrics.k3, 0.015),
    FrameworkMetric("slime", "train_rollout_logprob_abs_diff", lambda a, b: float(np.mean(_abs_diff(a, b))), 0.1),
    FrameworkMetric("TRL", "sampling_logp_difference/mean", lambda a, b: float(np.mean(_abs_diff(a, b)))),
    FrameworkMetric("TRL", "sampling_logp_difference/max", lambda a, b: float(np.max(_abs_diff(a, b)))),
)


def framework_metrics(rollout: ArrayLike, trainer: ArrayLike) -> dict[str, float]:
    """Every framework metric of finite token pairs, keyed ``framework:name``; empty without tokens."""
    a, b = np.asarray(rollout, dtype=np.float64), np.asarray(trainer, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if not a.size:
        return {}
    return {f"{m.framework}:{m.name}": float(m.compute(a, b)) for m in FRAMEWORK_METRICS}


def worst(checks: Sequence[dict[str, float]]) -> list[dict[str, object]]:
    """Each metric's worst value over ``checks`` (dicts of :func:`framework_metrics`), with its limit and verdict."""
    rows: list[dict[str, object]] = []
    for metric in FRAMEWORK_METRICS:
        key = f"{metric.framework}:{metric.name}"
        values = [c[key] for c in checks if key in c]
        if not values:
            continue
        if not metric.above:
            value = min(values)
        else:
            value = max(values, key=abs) if metric.absolute else max(values)
        rows.append({"framework": metric.framework, "metric": metric.name, "worst": value, "limit": metric.limit_text,
                     "verdict": "ALARM" if metric.alarming(value) else "ok", "checks": len(values)})
    return rows


def table(rows: Sequence[dict[str, object]]) -> list[str]:
    """:func:`worst` as lines of the terminal summary."""
    if not rows:
        return []
    lines = [f"  {'framework':<9} {'metric':<31} {'worst':>11}  {'alarm at':<10} verdict"]
    lines += [f"  {r['framework']:<9} {r['metric']:<31} {r['worst']:>11.4g}  {r['limit']:<10} {r['verdict']}" for r in rows]
    return lines
