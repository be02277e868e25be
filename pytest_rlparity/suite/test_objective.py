"""Objective layer of the built-in suite: a tiny RL loop's curves, in minutes on a CPU.

Rollouts come from the engine under test, weights go back into it every step through
the real update path, and the behaviour logprobs (engine) are kept apart from the
trainer's recomputed old-policy logprobs. The loop must stay on-policy at every step,
learn the toy reward, and follow its golden curves.
"""

from __future__ import annotations

import pytest

from pytest_rlparity.engines.vllm_worker import EXTENSION
from pytest_rlparity.golden import GoldenRecord
from pytest_rlparity.layers.objective import ON_POLICY, check_learns, check_on_policy, curves
from pytest_rlparity.model import CORPUS
from pytest_rlparity.plots import plot_curves
from pytest_rlparity.results import publish

pytestmark = pytest.mark.objective

RL_ENGINE = {"enable_prefix_caching": True, "worker_extension_cls": EXTENSION}
"""Shared with the inference-path weight-update checks, so no extra engine start."""


@pytest.fixture
def rl_engine(rlparity_session, rlparity_engine_factory):
    engine = rlparity_engine_factory(**(RL_ENGINE if rlparity_session.options.engine == "vllm" else {}))
    engine.update_weights(str(rlparity_session.model_dir))
    engine.reset_prefix_cache()
    return engine


@pytest.mark.parametrize("loss", ["gspo", "grpo", "ppo"])
def test_rl_loop_stays_on_policy_learns_and_follows_its_golden_curve(loss, rl_engine, rlparity_session, rlparity_golden, tmp_path):
    from pytest_rlparity.trainer.recompute import Trainer  # torch: imported only when the test runs
    from pytest_rlparity.trainer.rl import RLConfig, RLLoop, word_start_reward

    trainer = Trainer(rlparity_session.model_dir)
    prompts = [trainer.tokenizer(" ".join(s.split()[:3])).input_ids for s in CORPUS[:4]]
    config = RLConfig(loss=loss)
    history = RLLoop(rl_engine, trainer, prompts, config, word_start_reward(trainer.tokenizer), tmp_path).run()
    info = rl_engine.info
    record = GoldenRecord(sequences=[], stats={}, sampling={"loss": loss, **config.sampling.to_dict()}, curves=curves(history))
    plot = plot_curves(
        record.curves,
        _golden_curves(rlparity_golden, info),
        rlparity_session.golden_tolerance(info.dtype).curve_bands,
        str(rlparity_session.artifact_path(f"objective-{loss}.png")),
    )
    publish({"kind": "plot", "label": f"{loss} curves against their golden band", "plot": plot})
    check_on_policy(history, ON_POLICY.get(info.dtype, ON_POLICY["bfloat16"]), downstream_of=rlparity_session.failures_below("objective"))
    check_learns(history)
    rlparity_golden.check(record, info)


def _golden_curves(golden_check, info):
    from pytest_rlparity.golden import load

    path = golden_check.path(info)
    return load(path)["curves"] if path.exists() else None
