"""Plain value types shared by every layer: sampling settings and tolerances.

This module imports neither torch nor an engine, so test modules can build their
parametrisations from it at collection time without paying for a heavy import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

GREEDY_EPS = 1e-5
"""Temperatures below this are greedy, as in vLLM's sampler (``_SAMPLING_EPS``)."""


@dataclass(frozen=True)
class SamplingSettings:
    """What the sampler is asked to do; the trainer reproduces exactly this distribution.

    Field names and "off" values follow vLLM's ``SamplingParams`` (``top_k=0`` and
    ``top_p=1.0`` are off) so that a setting reads the same in both places.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 32
    seed: int | None = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0
    """How many of the most likely alternatives the engine reports per token (0: only the sampled one)."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def label(self) -> str:
        """A short id for test names and reports, listing only what differs from the default."""
        default = SamplingSettings()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                parts.append(f"{f.name}={_short(value)}")
        return ",".join(parts) or "default"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {unknown}; known: {sorted(known)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class Tolerance:
    """Bounds on engine-vs-trainer differences of per-token logprobs.

    Each bound is checked separately, so a report can say *which* statistic broke:
    a mean offset points at semantics, a large max with a small mean at a few tokens.
    ``None`` switches a bound off.
    """

    max_abs: float | None = 2e-4
    """Largest |engine - trainer| over all tokens, after ``rtol`` scaling."""
    mean_abs: float | None = 2e-5
    """Mean |engine - trainer|."""
    mean_offset: float | None = 1e-5
    """|mean(engine - trainer)|: a systematic bias, the signature of raw vs processed."""
    k3_kl: float | None = 1e-8
    """Mean k3 estimator of KL(engine || trainer), Schulman's low-variance estimator."""
    prob_diff_mean: float | None = 1e-5
    """Mean |p_engine - p_trainer| (verl's ``rollout_probs_diff_mean``)."""
    rtol: float = 0.0
    """Relative slack added to ``max_abs``, times |trainer logprob|."""
    max_out_of_support: float = 0.0
    """Share of sampled tokens that one side's processed distribution gives probability zero
    (top-k/top-p/min-p boundary tokens that rounding put on the other side)."""

    def replace(self, **changes: Any) -> Tolerance:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TOLERANCES: dict[str, Tolerance] = {
    # fp32 on CPU: measured noise floor max |diff| 8e-6, mean 1.8e-6 (docs/tolerances.md): ~25x headroom.
    "float32": Tolerance(),
    # bf16 bodies: verl calls a mean prob diff < 0.005 normal, > 0.01 a precision problem;
    # k3 measured 1.1e-3 for a bf16 engine on CPU (docs/tolerances.md), prime-rl alarms at 0.015.
    "bfloat16": Tolerance(
        max_abs=0.5,
        mean_abs=0.05,
        mean_offset=0.01,
        k3_kl=5e-3,
        prob_diff_mean=0.005,
        max_out_of_support=0.03,
    ),
}
TOLERANCES["float16"] = TOLERANCES["bfloat16"]


def tolerance_for(dtype: str) -> Tolerance:
    """The default tolerance for an engine running in ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no default tolerance for dtype {dtype!r}; known: {sorted(TOLERANCES)}") from None


@dataclass(frozen=True)
class Case:
    """One named sampling configuration of the built-in grid."""

    name: str
    settings: SamplingSettings
    why: str = field(default="", compare=False)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "|".join(map(str, value))
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
