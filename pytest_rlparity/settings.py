"""Plain value types shared by every layer: sampling settings and tolerances.

This module imports neither torch nor an engine, so test modules can build their
parametrisations from it at collection time without paying for a heavy import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .files import jsonable

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
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


FLOOR_STATS = ("max_abs", "mean_abs", "mean_offset", "k3_kl", "prob_diff_mean", "out_of_support")
"""Statistics a reduced-precision tolerance can scale to the model's precision floor."""

FLOOR_LIMITS = {
    "max_abs": 2.0,
    "mean_abs": 0.25,
    "mean_offset": 0.25,
    "k3_kl": 0.05,
    "prob_diff_mean": 0.1,
    "out_of_support": 0.05,
}
"""The largest precision floor that reduced precision alone explains (``out_of_support``: a share of
tokens). The largest seen, a random 1.04B Llama in bf16 with an fp32 head on an H100: max |Δ| 0.93,
mean |Δ| 0.12, k3 0.023 and mean |Δp| 0.043 at T=0.25 (which scales logprob differences by 4), a mean
offset of -0.122 over 64-token rollouts at T=1, 1.9 % of tokens outside the support at min-p; the limits
leave 2x over those. A twin that skipped its architecture's logit step was 1.5-124 nats off. A floor
beyond its limit is a wrong reference (:func:`check_floor`), and no bound scaled to a floor exceeds
its factor times this limit (:meth:`Tolerance.against_floor`)."""


def check_floor(floor: dict[str, float], what: str = "the precision floor") -> None:
    """Raise :class:`~pytest_rlparity.errors.ReferenceCheckError` unless ``floor`` (mismatch statistics of
    the trainer in the engine's precision against fp32) can scale bounds: it compared tokens, its values
    are finite, and none is beyond what reduced precision alone explains (:data:`FLOOR_LIMITS`).

    A NaN floor would make every bound NaN (``x > nan`` is never true) and a huge one would pass any
    engine: either way the verdict would say nothing, so none is given."""
    from .errors import ReferenceCheckError

    if not floor.get("tokens"):
        raise ReferenceCheckError(f"{what} compared no token: there is nothing to scale the bounds to")
    values = {**floor, "out_of_support": floor.get("out_of_support_share", 0.0)}
    bad = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
    if floor.get("not_a_number"):
        bad.append("not_a_number")
    if bad:
        raise ReferenceCheckError(
            f"{what} is not finite ({', '.join(f'{k}={values[k]}' for k in bad)}): the trainer in the engine's "
            "precision produced NaN or infinite logprobs, so no bound can be scaled to it"
        )
    beyond = {k: values[k] for k, limit in FLOOR_LIMITS.items() if k in values and abs(values[k]) > limit}
    if beyond:
        raise ReferenceCheckError(
            f"{what} is larger than reduced precision explains ("
            + ", ".join(f"{k} {v:.3g} > {FLOOR_LIMITS[k]:g}" for k, v in beyond.items())
            + "): the trainer in the engine's precision does not compute what the fp32 trainer does. Check that "
            "the model's forward is the trainer's (pytest_rlparity checks its own path at start), or judge an fp32 engine"
        )


@dataclass(frozen=True)
class Tolerance:
    """Bounds on engine-vs-trainer differences of per-token logprobs.

    Each bound is checked separately, so a report can say *which* statistic broke:
    a mean offset points at semantics, a large max with a small mean at a few tokens.

    A bound is absolute when set. Otherwise, if ``floor_factors`` names the statistic,
    the bound is that factor times the same statistic of the model's own precision floor
    (the trainer in the engine's precision against the trainer in fp32, on the same
    tokens; see :meth:`against_floor`); otherwise it is off. Absolute bounds suit fp32,
    where anything above rounding is a bug; floor bounds suit bf16, whose noise grows
    with the model, so that no fixed number fits every model.
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
    floor_factors: dict[str, float] = field(default_factory=dict)
    """Per statistic of :data:`FLOOR_STATS`: the bound is this many times the precision floor."""
    fp8_kv_budget: float = 10.0
    """The fp8 tier: how many times the bf16 precision floor's mean |Δ| an fp8 KV cache may cost
    (measured on CPU: 4.9-6.9x on three model shapes). A policy, set in a profile's ``[tolerance]``."""

    @property
    def calibrated(self) -> bool:
        """Whether some bound is still to be scaled to a precision floor."""
        return bool(self.floor_factors)

    def against_floor(self, floor: dict[str, float]) -> Tolerance:
        """Absolute bounds for one comparison, scaled to ``floor``: the
        :func:`~pytest_rlparity.metrics.mismatch_stats` of the trainer in the engine's
        precision against the fp32 trainer, plus ``out_of_support_share``.

        A floor bound is never sharper than full precision's (this class's defaults), so a
        model whose reduced-precision run happens to equal fp32 is still judged sanely, and never
        looser than its factor times :data:`FLOOR_LIMITS` (the mean offset's floor adds the noise of
        a mean, so its cap can bind); a floor that is empty, not finite or beyond those limits is an
        error (:func:`check_floor`), never a bound.
        """
        check_floor(floor)
        changes: dict[str, Any] = {"floor_factors": {}}
        full = Tolerance()
        for stat, factor in self.floor_factors.items():
            ceiling = factor * FLOOR_LIMITS[stat]
            if stat == "out_of_support":
                share = factor * floor.get("out_of_support_share", 0.0)
                changes["max_out_of_support"] = min(max(self.max_out_of_support, share), ceiling)
            elif getattr(self, stat) is None:
                changes[stat] = min(max(factor * floor_scale(stat, floor), getattr(full, stat)), ceiling)
        return dataclasses.replace(self, **changes)

    def replace(self, **changes: Any) -> Tolerance:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown tolerance field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def floor_scale(stat: str, floor: dict[str, float]) -> float:
    """The size of the precision floor for ``stat``: the floor's own value; for the mean
    offset, the floor's bias plus the noise of a mean over that many differences."""
    if not floor.get("tokens"):
        return 0.0
    if stat == "mean_offset":
        return abs(floor["mean_offset"]) + floor["mean_abs"] / math.sqrt(floor["tokens"])
    return abs(floor[stat])


@dataclass(frozen=True)
class Case:
    """One named sampling configuration of the built-in grid."""

    name: str
    settings: SamplingSettings


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "|".join(map(str, value))
    return str(value)
