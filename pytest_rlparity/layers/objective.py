"""Objective layer: the RL metrics a training run would show, in minutes on a CPU.

The seed post judged engines by training curves (clip rate, KL(new||old), entropy,
reward, policy-ratio mean). Here a tiny RL loop produces the same curves. Because the
engine is synced every step and rollouts are used at once, the behaviour policy (engine)
and the old policy (trainer, before the step) must agree at every step: ratio mean 1,
clip fraction 0, KL 0, up to numerical noise. Anything else is backend mismatch, and a
failing lower layer usually explains it, which the failure message says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ParityError
from ..results import jsonable, publish

if TYPE_CHECKING:
    from ..trainer.rl import StepMetrics

LAYER = "objective"


@dataclass(frozen=True)
class OnPolicyBounds:
    """Per-step bounds on behaviour-vs-old metrics; ``None`` switches one off."""

    ratio_mean: float | None
    """|mean ratio - 1|; NeMo-RL alarms at token_mult_prob_error 1.05."""
    k3_kl: float | None
    """prime-rl keeps the mismatch KL under 0.015."""
    mean_abs_log_ratio: float | None
    clip_fraction: float | None
    """Share of sequences (GSPO) or tokens clipped at the on-policy point."""


ON_POLICY: dict[str, OnPolicyBounds] = {
    # fp32 on CPU: measured |ratio - 1| ~1e-7, k3 ~1e-12 (docs/tolerances.md).
    "float32": OnPolicyBounds(ratio_mean=1e-3, k3_kl=1e-6, mean_abs_log_ratio=1e-4, clip_fraction=0.0),
    # bf16: the field's alarm levels; GSPO's 3e-4 sequence clip is below bf16 noise, so no clip bound.
    "bfloat16": OnPolicyBounds(ratio_mean=0.01, k3_kl=0.015, mean_abs_log_ratio=0.05, clip_fraction=None),
}
ON_POLICY["float16"] = ON_POLICY["bfloat16"]

def check_on_policy(history: Sequence[StepMetrics], bounds: OnPolicyBounds, *, downstream_of: Sequence[str] = ()) -> None:
    """Every step, behaviour (engine) and old (trainer) logprobs must agree within ``bounds``."""
    names = ("ratio_mean", "k3_kl", "mean_abs_log_ratio", "clip_fraction")
    excess = [{name: abs(m.ratio_mean - 1.0) if name == "ratio_mean" else getattr(m, name) for name in names} for m in history]
    problems = [
        f"step {m.step}: {name} {getattr(m, name):.4g} (bound {'|r-1| ' if name == 'ratio_mean' else ''}{bound:g})"
        for m, step_excess in zip(history, excess)
        for name in names
        if (bound := getattr(bounds, name)) is not None and step_excess[name] > bound
    ]
    worst = {name: max(e[name] for e in excess) for name in names} if history else {}
    publish({
        "kind": "metrics", "label": "on-policy metrics at every step", "layer": LAYER,
        "verdict": "fail" if problems else "pass", "stats": jsonable({f"worst_{k}": v for k, v in worst.items()}),
        "tolerance": dataclasses.asdict(bounds), "findings": [{"cause": "on-policy", "message": p} for p in problems[:12]],
    })
    if not problems:
        return
    first = problems[0]
    cause = "backend mismatch at step 0" if first.startswith("step 0:") else "mismatch after a weight update"
    named = ", ".join(downstream_of[:3]) + (f" and {len(downstream_of) - 3} more" if len(downstream_of) > 3 else "")
    blame = (
        f"probably downstream of the failing {named} check(s): fix those first"
        if downstream_of
        else "the engine's behaviour logprobs are not the trainer's old-policy logprobs"
    )
    raise ParityError(
        f"[{LAYER}] on-policy metrics out of bounds ({cause}); {blame}\n  - " + "\n  - ".join(problems[:12])
        + "\n" + curve_table(history),
        layer=LAYER,
        cause=cause,
        headline=f"{first}; {blame}",
    )


def check_learns(history: Sequence[StepMetrics], min_gain: float = 0.1) -> None:
    """The clean loop must learn: mean reward of the last 3 steps beats the first 3 by ``min_gain``."""
    first = sum(m.reward for m in history[:3]) / 3
    last = sum(m.reward for m in history[-3:]) / 3
    publish({
        "kind": "metrics", "label": "the loop learns", "layer": LAYER, "verdict": "pass" if last >= first + min_gain else "fail",
        "stats": {"reward_first3": first, "reward_last3": last}, "tolerance": {"min_gain": min_gain}, "findings": [],
    })
    if last < first + min_gain:
        raise ParityError(
            f"[{LAYER}] the RL loop did not learn: reward {first:.3f} -> {last:.3f} (needs +{min_gain})\n" + curve_table(history),
            layer=LAYER,
            cause="no learning",
        )


def curves(history: Sequence[StepMetrics]) -> dict[str, list[float]]:
    names = list(history[0].as_dict()) if history else []
    return {n: [m.as_dict()[n] for m in history] for n in names if n != "step"}


def curve_table(history: Sequence[StepMetrics]) -> str:
    cols = ("reward", "ratio_mean", "clip_fraction", "k3_kl", "kl_new_old", "entropy", "ess")
    lines = ["  step " + "".join(f"{c:>14}" for c in cols)]
    for m in history:
        lines.append(f"  {m.step:>4} " + "".join(f"{getattr(m, c):>14.6g}" for c in cols))
    return "\n".join(lines)
