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
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ParityError, ReferenceCheckError
from ..files import jsonable
from ..numerics import OnPolicyBounds
from ..checks import publish
from . import causes

if TYPE_CHECKING:
    from ..trainer.rl import StepMetrics

LAYER = "objective"


def check_on_policy(history: Sequence[StepMetrics], bounds: OnPolicyBounds, *, downstream_of: Sequence[str] = ()) -> None:
    """Every step, behaviour (engine) and old (trainer) logprobs must agree within ``bounds``."""
    names = ("ratio_mean", "k3_kl", "mean_abs_log_ratio", "clip_fraction")
    excess = [{name: _excess(m, name) for name in names} for m in history]
    problems = []
    for m, step_excess in zip(history, excess):
        for name in names:
            bound = step_bound(bounds, m, name)
            if bound is None or step_excess[name] <= bound:
                continue
            scaled = f", {bounds.floor_factors[name]:g}x this step's precision floor" if bound != getattr(bounds, name) else ""
            what = "|r-1| " if name == "ratio_mean" else ""
            problems.append(f"step {m.step}: {name} {getattr(m, name):.4g} (bound {what}{bound:.3g}{scaled})")
        problems += _left_out(m, bounds)
    worst = {name: max(e[name] for e in excess) for name in names} if history else {}
    publish({
        "kind": "metrics", "label": "on-policy metrics at every step", "layer": LAYER,
        "verdict": "fail" if problems else "pass", "stats": jsonable({f"worst_{k}": v for k, v in worst.items()}),
        "tolerance": dataclasses.asdict(bounds), "findings": [{"cause": cause_of(p), "message": p} for p in problems[:12]],
    })
    if not problems:
        return
    first = problems[0]
    cause = cause_of(first)
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


def cause_of(problem: str) -> str:
    """An on-policy problem at step 0 is the backend's; later, the weight update's."""
    return causes.BACKEND_MISMATCH if problem.startswith("step 0:") else causes.MISMATCH_AFTER_UPDATE


def _left_out(m: StepMetrics, bounds: OnPolicyBounds) -> list[str]:
    """Tokens without a ratio: any NaN, or more -inf logprobs than the bounds allow."""
    found = []
    if m.not_a_number:
        found.append(f"step {m.step}: {m.not_a_number} of {m.tokens} token(s) have a NaN behaviour or old logprob")
    if m.behaviour_impossible:
        found.append(
            f"step {m.step}: the engine gives {m.behaviour_impossible} of {m.tokens} token(s) it sampled probability 0 "
            "(behaviour logprob -inf): a NaN or a JSON -9999 read as -inf on the way, or another distribution's logprobs"
        )
    if m.outside_support > bounds.max_outside_support * m.tokens:
        found.append(
            f"step {m.step}: {m.outside_support} of {m.tokens} token(s) have a -inf behaviour or old logprob (outside "
            f"one side's support; > {bounds.max_outside_support:.0%} allowed)"
        )
    return found


def _excess(m: StepMetrics, name: str) -> float:
    value = getattr(m, name)
    return abs(value - 1.0) if name.endswith("ratio_mean") else value


def step_bound(bounds: OnPolicyBounds, m: StepMetrics, name: str) -> float | None:
    """The bound on ``name`` at step ``m``: absolute, or that many times the step's precision floor if larger;
    a floor that is not finite or beyond its limit (``floor_limits``) is an error, so no bound exceeds the
    factor times that limit."""
    bound = getattr(bounds, name)
    factor = bounds.floor_factors.get(name)
    if bound is None or factor is None:
        return bound
    floor, limit = _excess(m, "floor_" + name), bounds.floor_limits[name]
    if not 0.0 <= floor <= limit:
        raise ReferenceCheckError(
            f"step {m.step}: the precision floor of {name} (the trainer in the engine's precision vs fp32 on the "
            f"step's rollouts) is {floor:.3g}, {'not finite' if not math.isfinite(floor) else f'beyond its limit {limit:g}'}: "
            "the reference is wrong, so no on-policy bound can be scaled to it"
        )
    return max(bound, factor * floor)


def check_learns(history: Sequence[StepMetrics], min_gain: float = 0.1) -> None:
    """The clean loop must learn: mean reward of the last 3 steps beats the first 3 by ``min_gain``."""
    summary = curve_summaries(history)
    last = summary["reward_last"]
    first = last - summary["reward_gain"]
    learned = summary["reward_gain"] >= min_gain
    publish({
        "kind": "metrics", "label": "the loop learns", "layer": LAYER, "verdict": "pass" if learned else "fail",
        "stats": {"reward_first3": first, "reward_last3": last}, "tolerance": {"min_gain": min_gain}, "findings": [],
    })
    if not learned:
        raise ParityError(
            f"[{LAYER}] the RL loop did not learn: reward {first:.3f} -> {last:.3f} (needs +{min_gain})\n" + curve_table(history),
            layer=LAYER,
            cause=causes.NO_LEARNING,
        )


def curve_summaries(history: Sequence[StepMetrics], last: int = 3) -> dict[str, float]:
    """Where a run goes, what objective goldens judge across machines: reward gain (mean of the last
    ``last`` steps minus the first ``last``), final reward (mean of the last steps), and the mean
    entropy over all steps (the final entropy alone varies from 0.02 to 1.4 nats between seeds).

    Step-by-step trajectories follow the sampled rollouts, which no two machines draw alike (fp32
    CPU rollouts diverged between an Intel and an AMD box from step 5 on): plotted, not judged."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    reward = [m.reward for m in history]
    return {
        "reward_gain": mean(reward[-last:]) - mean(reward[:last]),
        "reward_last": mean(reward[-last:]),
        "entropy_mean": mean([m.entropy for m in history]),
    }


def curves(history: Sequence[StepMetrics]) -> dict[str, list[float]]:
    """Each metric per step, for goldens and plots (token counts are checked, not plotted)."""
    from ..trainer.rl import COUNTS

    names = list(history[0].as_dict()) if history else []
    return {n: [m.as_dict()[n] for m in history] for n in names if n != "step" and n not in COUNTS}


def curve_table(history: Sequence[StepMetrics]) -> str:
    cols = ("reward", "ratio_mean", "clip_fraction", "k3_kl", "kl_new_old", "entropy", "ess")
    lines = ["  step " + "".join(f"{c:>14}" for c in cols)]
    for m in history:
        lines.append(f"  {m.step:>4} " + "".join(f"{getattr(m, c):>14.6g}" for c in cols))
    return "\n".join(lines)
