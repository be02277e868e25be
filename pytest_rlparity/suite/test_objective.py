"""Objective layer of the built-in suite: a tiny RL loop's curves, in minutes on a CPU.

Rollouts come from the engine under test, weights go back into it every step through
the real update path, and the behaviour logprobs (engine) are kept apart from the
trainer's recomputed old-policy logprobs. The loop must stay on-policy at every step,
learn the toy reward, and end up where runs with other seeds ended up (the golden keeps
the summaries of :data:`RECORDED_SEEDS` runs; step-by-step trajectories follow the
sampled rollouts, which differ between machines, and are plotted, not judged).
"""

from __future__ import annotations

import pytest

from pytest_rlparity.engines.base import VLLM_ENGINE_ARGS
from pytest_rlparity.golden import Snapshot, load
from pytest_rlparity.layers.objective import check_learns, check_on_policy, curve_summaries, curves
from pytest_rlparity.model import CORPUS
from pytest_rlparity.plots import plot_curves
from pytest_rlparity.checks import publish
from pytest_rlparity.suite import RL_ENGINE

pytestmark = pytest.mark.objective

RECORDED_SEEDS = 4
"""Runs (seeds) a golden is recorded from: the band a later run, on any machine, must land in."""
SEED_STRIDE = 1_000_003
"""Distance between recorded seeds; the suite seed (``--rlparity-seed``) is the first."""


@pytest.fixture
def rl_engine(rlparity_session, rlparity_engine_factory):
    engine = rlparity_engine_factory(**(RL_ENGINE if rlparity_session.supports(VLLM_ENGINE_ARGS) else {}))
    engine.update_weights(str(rlparity_session.model_dir))
    engine.reset_prefix_cache()
    return engine


@pytest.mark.parametrize("loss", [pytest.param(loss, marks=pytest.mark.xdist_group(f"rl-engine-{loss}")) for loss in ("gspo", "grpo", "ppo")])
def test_rl_loop_stays_on_policy_learns_and_follows_its_golden_curve(loss, rl_engine, rlparity_session, rlparity_golden):
    from pytest_rlparity.trainer.rl import (  # torch: only when it runs
        RLConfig,
        RLLoop,
        width_scaled_lr,
        word_start_reward,
    )

    info = rl_engine.info
    numerics = rlparity_session.numerics
    golden_path = rlparity_golden.path(info)
    recording = rlparity_session.goldens.mode != "off"
    seeds = [rlparity_session.options.seed + k * SEED_STRIDE for k in range(RECORDED_SEEDS if recording else 1)]
    runs = []
    for seed in seeds:
        rl_engine.update_weights(str(rlparity_session.model_dir))
        rl_engine.reset_prefix_cache()
        trainer = rlparity_session.new_trainer()
        prompts = [trainer.tokenizer(" ".join(s.split()[:3])).input_ids for s in CORPUS[:4]]
        config = RLConfig(loss=loss, seed=seed, lr=width_scaled_lr(trainer))
        history = RLLoop(rl_engine, trainer, prompts, config, word_start_reward(trainer.tokenizer)).run()
        check_on_policy(history, numerics.on_policy, downstream_of=rlparity_session.record.failures_below("objective"))
        check_learns(history)
        runs.append(history)
    sampling = {"loss": loss, **RLConfig().sampling.to_dict()}
    summaries = [curve_summaries(h) for h in runs]
    record = Snapshot(
        sequences=[], stats={}, sampling=sampling, curves=curves(runs[0]),
        summaries={name: [s[name] for s in summaries] for name in summaries[0]},
    )
    golden = load(golden_path) if golden_path.exists() else None
    plot = plot_curves(
        record.curves,
        golden["curves"] if golden else None,
        numerics.golden.curve_bands,
        str(rlparity_session.record.artifact_path(f"objective-{loss}.png")),
    )
    publish({"kind": "plot", "label": f"{loss} curves against their golden", "plot": plot})
    rlparity_golden.check(record, info)
