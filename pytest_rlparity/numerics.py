"""How close is close enough, per dtype: one definition, and one rule for dtypes it lacks.

Full precision (fp32) is judged with absolute bounds: engine and trainer run the same
arithmetic, so anything above rounding is a bug. Reduced precision (bf16, fp16) is judged
against the model's own precision floor: the trainer in the engine's precision against the
trainer in fp32 on the same tokens. A fixed bf16 bound fits one model size and fails the
next (a 2-layer model sits at mean |Δ| 0.03, a 1B model at 0.05-0.07 for a clean engine),
whereas the floor grows with the model as the engine's own noise does.

Every number here is measured; docs/tolerances.md gives the measurements and machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .settings import FLOOR_LIMITS, Tolerance


@dataclass(frozen=True)
class GoldenTolerance:
    """How far a run may drift from its golden."""

    logprob_atol: float
    """Per-token |now - golden| for the same token ids."""
    logprob_floor_factor: float = 0.0
    """Reduced precision: the per-token bound is at least this many times the largest difference
    between the trainer in the engine's precision and in fp32 that the golden recorded
    (``floor_max_abs``): compiled bf16 kernels differ between engine starts by up to that much."""
    stats_atol: dict[str, float] = field(default_factory=dict)
    """Per statistic |now - golden|; statistics not listed are recorded but not compared."""
    curve_bands: dict[str, float] = field(default_factory=dict)
    """Per on-policy curve, the half-width of the band every step must stay in."""
    summary_slack: dict[str, float] = field(default_factory=dict)
    """Per run summary (:func:`~pytest_rlparity.layers.objective.curve_summaries`): the least a band
    around the recorded seeds is widened by (it is widened by their range where that is larger)."""


@dataclass(frozen=True)
class OnPolicyBounds:
    """Per-step bounds on behaviour (engine) vs old (trainer) metrics; ``None`` switches one off.

    With ``floor_factors`` a bound is ``max(bound, factor * floor)``, the floor being the same metric of
    the trainer in the engine's precision against the fp32 trainer at that step, and at most
    ``factor * floor_limits[name]``.
    """

    ratio_mean: float | None
    """|mean ratio - 1|; NeMo-RL alarms at token_mult_prob_error 1.05."""
    k3_kl: float | None
    """prime-rl keeps the mismatch KL under 0.015."""
    mean_abs_log_ratio: float | None
    clip_fraction: float | None
    """Share of sequences (GSPO) or tokens clipped at the on-policy point."""
    floor_factors: dict[str, float] = field(default_factory=dict)
    floor_limits: dict[str, float] = field(default_factory=dict)
    """Per floor-scaled bound, the largest step floor reduced precision explains (one per ``floor_factors``
    key): a larger one is an error, so no bound exceeds its factor times this."""
    max_outside_support: float = 0.0
    """Share of rollout tokens whose behaviour or old logprob is -inf (one side's top-k/top-p cut
    the token): such tokens have no ratio, so they are counted, bounded, and never dropped silently.
    NaN logprobs always fail."""


@dataclass(frozen=True)
class Numerics:
    """Everything that says "close enough" for one engine dtype."""

    dtype: str
    tolerance: Tolerance
    """Engine vs trainer, per token."""
    golden: GoldenTolerance
    on_policy: OnPolicyBounds

    @property
    def reduced(self) -> bool:
        return self.tolerance.calibrated


FLOOR_FACTORS = {
    "max_abs": 4.0,
    "mean_abs": 4.0,
    "mean_offset": 8.0,
    "k3_kl": 12.0,
    "prob_diff_mean": 4.0,
    "out_of_support": 4.0,
}
"""Reduced precision: each bound is this many times the model's precision floor. Clean engines
measured at 0.8-1.3x their floor (mean |Δ| and max |Δ|, CPU and H100, 2-layer and 1B models), the
mean offset at up to 2.4x (its floor is near zero); the factors leave 3x over the worst clean ratio,
and the seed post's faults land 3x or more beyond the bound of k3 (docs/tolerances.md)."""

FULL = Numerics(
    "float32",
    # fp32 on CPU: measured noise floor max |diff| 1e-5, mean 1.8e-6 (docs/tolerances.md): ~20x headroom.
    Tolerance(),
    GoldenTolerance(
        logprob_atol=1e-4,
        stats_atol={"max_abs": 2e-4, "mean_abs": 2e-5, "mean_offset": 1e-5, "k3_kl": 1e-8, "prob_diff_mean": 1e-5},
        curve_bands={"ratio_mean": 1e-3, "k3_kl": 1e-6, "mean_abs_log_ratio": 1e-4, "clip_fraction": 0.05},
        summary_slack={"reward_gain": 0.1, "reward_last": 0.1, "entropy_mean": 0.25},
    ),
    # measured |ratio - 1| ~1e-7, k3 ~1e-12 on CPU (docs/tolerances.md).
    OnPolicyBounds(ratio_mean=1e-3, k3_kl=1e-6, mean_abs_log_ratio=1e-4, clip_fraction=0.0),
)

REDUCED = Numerics(
    "bfloat16",
    Tolerance(
        max_abs=None, mean_abs=None, mean_offset=None, k3_kl=None, prob_diff_mean=None,
        max_out_of_support=0.03, floor_factors=dict(FLOOR_FACTORS),
    ),
    GoldenTolerance(
        logprob_atol=0.1,
        logprob_floor_factor=1.0,
        # Distances to the floor, not raw statistics: they travel across model sizes.
        stats_atol={"floor_ratio_mean_abs": 1.0, "floor_ratio_k3_kl": 3.0, "floor_ratio_prob_diff_mean": 1.0},
        curve_bands={"ratio_mean": 0.01},
        summary_slack={"reward_gain": 0.15, "reward_last": 0.15, "entropy_mean": 0.3},
    ),
    # The field's alarm levels, or 4x the step's own precision floor where that is larger;
    # GSPO's 3e-4 sequence clip is below bf16 noise, so no clip bound.
    OnPolicyBounds(
        ratio_mean=0.01, k3_kl=0.015, mean_abs_log_ratio=0.05, clip_fraction=None,
        floor_factors={"ratio_mean": 4.0, "k3_kl": 12.0, "mean_abs_log_ratio": 4.0},
        # NeMo-RL's token_mult_prob_error alarm (1.05), and the engine-vs-trainer limits of settings.FLOOR_LIMITS.
        floor_limits={"ratio_mean": 0.05, "k3_kl": FLOOR_LIMITS["k3_kl"], "mean_abs_log_ratio": FLOOR_LIMITS["mean_abs"]},
        max_outside_support=0.03,
    ),
)

NUMERICS: dict[str, Numerics] = {"float32": FULL, "bfloat16": REDUCED, "float16": REDUCED}


def numerics_for(dtype: str) -> Numerics:
    """The numerics of an engine running in ``dtype``; an unknown dtype is an error, never a guess."""
    try:
        return NUMERICS[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(
            f"no numerics for dtype {dtype!r}; known: {', '.join(sorted(NUMERICS))}. "
            "Set the engine kwarg dtype to one of them."
        ) from None
