"""A tiny RL loop: engine rollouts, group-relative advantages, GSPO/GRPO/PPO, weight sync.

Small enough to run a dozen steps on a CPU in seconds, real enough to show what the
seed post saw on GPU-days: the behaviour-policy logprobs come from the engine at rollout
time, the old-policy logprobs are recomputed by the trainer before the step, and the
two are reported apart, so backend mismatch is not mistaken for staleness.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics, sampling
from ..engines.base import Completion, WeightSync
from ..settings import SamplingSettings
from .recompute import Trainer

LOSSES = ("gspo", "grpo", "ppo")

COUNTS = ("tokens", "not_a_number", "outside_support")
"""The token counts of :class:`StepMetrics`: checked every step, not curves to plot."""


@dataclass(frozen=True)
class RLConfig:
    """The loop's knobs; defaults learn the toy reward within ~12 steps on the embedded model."""

    loss: str = "gspo"
    steps: int = 12
    group_size: int = 8
    lr: float = 3e-3
    epochs: int = 2
    """Optimizer passes over each batch; the second sees ratios away from 1, so clipping matters."""
    eps_low: float = 0.2
    eps_high: float = 0.28
    seq_eps_low: float = 3e-4
    seq_eps_high: float = 4e-4
    """GSPO clips the sequence-level ratio with much smaller bounds (the GSPO paper's values)."""
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=0.8, top_k=50, max_tokens=16))
    update_method: str = "reload_dir"
    seed: int = 0
    """Step ``s`` samples with seed ``seed + 10000 * s``: another seed is another run of the same loop."""


def width_scaled_lr(trainer: Trainer, base: float = 3e-3, width: int = 128) -> float:
    """``base`` (tuned on the 128-wide embedded model) scaled by 1/width, as muP scales Adam's step:
    at 3e-3 a 2048-wide 1B policy collapses in a few steps (its reward fell from 0.17 to 0)."""
    return base * min(1.0, width / int(trainer.model.config.hidden_size))


def word_start_reward(tokenizer: Any) -> Callable[[Completion], float]:
    """Toy reward: the share of generated tokens that start a word (a leading space).

    Deterministic, dense and learnable by a random tiny model within a few steps.
    """
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    starts = {i for i, tok in enumerate(vocab) if tok and tok.startswith("\u0120")}

    def reward(c: Completion) -> float:
        return sum(t in starts for t in c.token_ids) / max(len(c.token_ids), 1)

    return reward


@dataclass
class StepMetrics:
    """One step's objective metrics; ``mismatch_*`` compare behaviour (engine) with old (trainer)."""

    step: int
    reward: float
    ratio_mean: float
    mean_abs_log_ratio: float
    k1_kl: float
    k3_kl: float
    clip_fraction: float
    ess: float
    chi2: float
    entropy: float
    kl_new_old: float
    """k3 KL between the trainer after the step and before it, on the rollout tokens."""
    tokens: int = 0
    not_a_number: int = 0
    outside_support: int = 0
    """Rollout tokens, and those left out of the ratios: a NaN, or a -inf (outside one side's support),
    behaviour or old logprob."""
    behaviour_impossible: int = 0
    """Rollout tokens whose behaviour (engine) logprob is -inf: the engine sampled a token it gives probability 0."""
    floor_ratio_mean: float = 1.0
    floor_k3_kl: float = 0.0
    floor_mean_abs_log_ratio: float = 0.0
    """The same three metrics between the trainer in the engine's precision and in fp32, on the
    step's rollouts: the precision floor of a reduced-precision engine (1, 0, 0 without a twin)."""

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


class RLLoop:
    """Runs steps of rollout -> recompute -> loss -> optimizer step -> weight sync."""

    def __init__(
        self,
        engine: Any,
        trainer: Trainer,
        prompts: Sequence[Sequence[int]],
        config: RLConfig,
        reward: Callable[[Completion], float],
        workdir: Path | None = None,
    ) -> None:
        if config.loss not in LOSSES:
            raise ValueError(f"loss {config.loss!r} not in {LOSSES}")
        if not isinstance(engine, WeightSync):
            raise TypeError(f"{type(engine).__name__} cannot take weight updates (see engines.base.WeightSync)")
        self.engine = engine
        self.trainer = trainer
        self.prompts = [list(p) for p in prompts]
        self.config = config
        self.reward = reward
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="rlparity-rl-"))
        self.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.history: list[StepMetrics] = []

    def run(self) -> list[StepMetrics]:
        try:
            for step in range(self.config.steps):
                self.history.append(self.step(step))
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return self.history

    def step(self, step: int) -> StepMetrics:
        cfg = self.config
        settings = replace(cfg.sampling, seed=cfg.seed + step * 10_000)
        batch = [p for p in self.prompts for _ in range(cfg.group_size)]
        completions = [c for c in self.engine.generate(batch, settings) if c.token_ids]
        rewards = np.array([self.reward(c) for c in completions])
        advantages = _group_advantages(rewards, cfg.group_size, len(completions))
        behaviour = [np.asarray(c.logprobs, dtype=np.float64) for c in completions]
        before = self.trainer.recompute(completions, settings)
        old = [np.asarray(x) for x in before.processed]
        flat_b, flat_o = np.concatenate(behaviour), np.concatenate(old)
        finite = np.isfinite(flat_b) & np.isfinite(flat_o)
        ratios = np.exp(flat_o[finite] - flat_b[finite])  # the tokens left out are counted below
        floor = _floor_metrics(before.twin_processed, flat_o)
        entropy = float(np.mean([h for row in before.entropy or [] for h in row]))
        clipped = self._optimize(completions, settings, behaviour, advantages)
        new = [np.asarray(x) for x in self.trainer.recompute(completions, settings).processed]
        flat_n = np.concatenate(new)
        ok = finite & np.isfinite(flat_n)
        self._sync(step)
        return StepMetrics(
            step=step,
            reward=float(rewards.mean()),
            ratio_mean=float(ratios.mean()),
            mean_abs_log_ratio=float(np.abs(np.log(ratios)).mean()),
            k1_kl=metrics.k1(flat_b[finite], flat_o[finite]),
            k3_kl=metrics.k3(flat_b[finite], flat_o[finite]),
            clip_fraction=clipped,
            ess=metrics.ess(ratios),
            chi2=metrics.chi2(ratios),
            entropy=entropy,
            kl_new_old=metrics.k3(flat_o[ok], flat_n[ok]),
            tokens=int(flat_b.size),
            not_a_number=int((np.isnan(flat_b) | np.isnan(flat_o)).sum()),
            outside_support=int((~finite & ~np.isnan(flat_b) & ~np.isnan(flat_o)).sum()),
            behaviour_impossible=int((flat_b == -np.inf).sum()),
            **floor,
        )

    def _optimize(
        self,
        completions: Sequence[Completion],
        settings: SamplingSettings,
        behaviour: Sequence[np.ndarray],
        advantages: np.ndarray,
    ) -> float:
        """``epochs`` optimizer steps on the batch; returns the clip fraction of the first epoch."""
        cfg = self.config
        self.trainer.model.train()
        first_clip = 0.0
        device = self.trainer.device
        for epoch in range(cfg.epochs):
            losses, clipped, counted = [], 0.0, 0
            batch = self.trainer.completions_logits([(c.prompt_ids, c.token_ids) for c in completions], grad=True)
            for c, logits, lp_b, adv in zip(completions, batch, behaviour, advantages):
                lp = sampling.processed_logprobs(logits, settings, c.prompt_ids, c.token_ids)
                lp_new = lp.gather(1, torch.as_tensor(c.token_ids, device=device).unsqueeze(1)).squeeze(1)
                old = torch.as_tensor(lp_b, dtype=torch.float32, device=device)
                mask = torch.isfinite(lp_new) & torch.isfinite(old)
                if not bool(mask.any()):
                    continue
                log_ratio = (lp_new - old)[mask]
                loss, frac = _surrogate(cfg, log_ratio, float(adv))
                losses.append(loss)
                clipped += frac
                counted += 1
            if not losses:
                break
            self.optimizer.zero_grad(set_to_none=True)
            torch.cat(losses).mean().backward()
            self.optimizer.step()
            if epoch == 0:
                first_clip = clipped / max(counted, 1)
        self.trainer.model.eval()
        return first_clip

    def _sync(self, step: int) -> None:
        """Save, push, and drop the previous checkpoint: a 1B policy writes 4 GB a step, 12 of which fill a disk."""
        path = self.trainer.save(self.workdir / f"step{step + 1}")
        self.engine.update_weights(path, method=self.config.update_method)
        self.engine.reset_prefix_cache()
        shutil.rmtree(self.workdir / f"step{step}", ignore_errors=True)


def _floor_metrics(twin: list[list[float]] | None, old: np.ndarray) -> dict[str, float]:
    """Ratio mean, k3 and mean |log r| of the twin (engine precision) against the fp32 recompute."""
    if twin is None:
        return {}
    low = np.concatenate([np.asarray(x, dtype=np.float64) for x in twin])
    both = np.isfinite(low) & np.isfinite(old)
    log_r = old[both] - low[both]
    return {
        "floor_ratio_mean": float(np.mean(np.exp(log_r))),
        "floor_k3_kl": metrics.k3(low[both], old[both]),
        "floor_mean_abs_log_ratio": float(np.mean(np.abs(log_r))),
    }


def _group_advantages(rewards: np.ndarray, group: int, n: int) -> np.ndarray:
    """GRPO's group-relative advantage: (r - mean of the group) / (std of the group + eps)."""
    advantages = np.zeros(n)
    for start in range(0, n, group):
        chunk = rewards[start : start + group]
        advantages[start : start + group] = (chunk - chunk.mean()) / (chunk.std() + 1e-6)
    return advantages


def _surrogate(cfg: RLConfig, log_ratio: torch.Tensor, advantage: float) -> tuple[torch.Tensor, float]:
    """Clipped surrogate of one sequence and its clip fraction.

    Returns one loss per sequence for GSPO (sequence-level ratio) and GRPO (token mean),
    one per token for PPO, so the caller's mean weighs them the way each method does.
    """
    if cfg.loss == "gspo":
        ratio = torch.exp(log_ratio.mean())
        clipped = torch.clamp(ratio, 1 - cfg.seq_eps_low, 1 + cfg.seq_eps_high)
        loss = -torch.minimum(ratio * advantage, clipped * advantage)
        return loss.reshape(1), float((ratio != clipped).float())
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    frac = float((ratio != clipped).float().mean())
    return (per_token.mean().reshape(1) if cfg.loss == "grpo" else per_token), frac
