"""Token-level mismatch and RL metrics, with the field's definitions, on numpy arrays.

``r = exp(lp_trainer - lp_rollout)`` is the per-token policy ratio. All functions take
1-D arrays of finite logprobs (callers drop tokens outside a distribution's support
first and count them separately).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _arrays(rollout: ArrayLike, trainer: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    a = np.asarray(rollout, dtype=np.float64)
    b = np.asarray(trainer, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: rollout {a.shape} vs trainer {b.shape}")
    return a, b


def log_ratio(rollout: ArrayLike, trainer: ArrayLike) -> NDArray[np.float64]:
    """``log r = lp_trainer - lp_rollout`` per token."""
    a, b = _arrays(rollout, trainer)
    return b - a


def k1(rollout: ArrayLike, trainer: ArrayLike) -> float:
    """Mean k1 estimator ``-log r`` of KL(rollout || trainer) under rollout samples."""
    return float(np.mean(-log_ratio(rollout, trainer))) if np.size(rollout) else 0.0


def k3(rollout: ArrayLike, trainer: ArrayLike) -> float:
    """Mean k3 estimator ``r - 1 - log r`` (Schulman): unbiased, non-negative, low variance."""
    lr = log_ratio(rollout, trainer)
    return float(np.mean(np.expm1(lr) - lr)) if lr.size else 0.0


def prob_diff_mean(rollout: ArrayLike, trainer: ArrayLike) -> float:
    """Mean ``|p_rollout - p_trainer|`` (verl's ``rollout_probs_diff_mean``)."""
    a, b = _arrays(rollout, trainer)
    return float(np.mean(np.abs(np.exp(a) - np.exp(b)))) if a.size else 0.0


def prob_correlation(rollout: ArrayLike, trainer: ArrayLike) -> float:
    """Pearson correlation of token probabilities (MiniMax-M1's train/inference diagnostic)."""
    a, b = _arrays(rollout, trainer)
    if a.size < 2:
        return 1.0
    pa, pb = np.exp(a), np.exp(b)
    if np.std(pa) == 0 or np.std(pb) == 0:
        return 1.0 if np.allclose(pa, pb) else 0.0
    return float(np.corrcoef(pa, pb)[0, 1])


def ratio_mean(rollout: ArrayLike, trainer: ArrayLike) -> float:
    lr = log_ratio(rollout, trainer)
    return float(np.mean(np.exp(lr))) if lr.size else 1.0


def ess(ratios: ArrayLike) -> float:
    """Normalised effective sample size ``(sum r)^2 / (N sum r^2)``, in (0, 1]."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        return 1.0
    return float(np.sum(r) ** 2 / (r.size * np.sum(r**2)))


def chi2(ratios: ArrayLike) -> float:
    """``mean(r^2) - 1``: the chi-squared divergence estimate of the correction term."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(r**2) - 1.0) if r.size else 0.0


def clip_fraction(ratios: ArrayLike, eps_low: float, eps_high: float) -> float:
    """Share of ratios outside ``[1 - eps_low, 1 + eps_high]``."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        return 0.0
    return float(np.mean((r < 1 - eps_low) | (r > 1 + eps_high)))


def sequence_ratio(rollout: ArrayLike, trainer: ArrayLike) -> float:
    """GSPO's sequence-level ratio ``exp(mean_t log r_t)``."""
    lr = log_ratio(rollout, trainer)
    return float(np.exp(np.mean(lr))) if lr.size else 1.0


def mismatch_stats(rollout: ArrayLike, trainer: ArrayLike) -> dict[str, float]:
    """The summary statistics every logprob comparison reports."""
    a, b = _arrays(rollout, trainer)
    diff = a - b
    if not diff.size:
        return {"tokens": 0}
    return {
        "tokens": int(diff.size),
        "max_abs": float(np.max(np.abs(diff))),
        "mean_abs": float(np.mean(np.abs(diff))),
        "mean_offset": float(np.mean(diff)),
        "k1_kl": k1(a, b),
        "k3_kl": k3(a, b),
        "prob_diff_mean": prob_diff_mean(a, b),
        "prob_correlation": prob_correlation(a, b),
        "ratio_mean": ratio_mean(a, b),
    }
