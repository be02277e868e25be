"""The built-in suite's inference-path checks, run as they are, each on a clean engine and on the fault
it exists to catch: batch-variant kernels, unseeded sampling, a chunk boundary that loses state, prefill
that never chunked, a cached path with other numbers, a cache that is never hit, a runtime mode that
drifts. The engine is the transformers reference engine with a fault wrapped around it (fast, no vLLM);
tests/test_vllm_cpu.py runs the same checks clean on real vLLM.
"""

from __future__ import annotations

import types

import pytest

from pytest_rlparity.engines.faults import FaultyEngine
from pytest_rlparity.errors import ParityError
from pytest_rlparity.model import tokens_of_length
from pytest_rlparity.numerics import numerics_for
from pytest_rlparity.settings import Tolerance
from pytest_rlparity.suite import CHUNK, SHARED_PREFIX
from pytest_rlparity.suite import test_inference_path as suite

FP32 = Tolerance()
SESSION = types.SimpleNamespace(numerics=numerics_for("float32"), seeded=lambda settings: settings, engine_kwargs={})
"""What the checks read from the parity session: fp32 numerics, the suite's seeds unchanged."""


@pytest.fixture(scope="module")
def long_prompts(trainer) -> list[list[int]]:
    prefix = tokens_of_length(trainer.tokenizer, SHARED_PREFIX)
    return [prefix + [40 + i] for i in range(3)]


def fails_with(cause: str, check, *args) -> ParityError:
    with pytest.raises(ParityError) as info:
        check(*args)
    assert info.value.cause == cause, str(info.value)
    return info.value


def test_batch_composition(hf_engine, trainer, long_prompts, prompts):
    check = suite.test_batch_composition_does_not_change_scores
    check(None, hf_engine, trainer, long_prompts, prompts, FP32)
    error = fails_with("batch composition", check, None, FaultyEngine(hf_engine, batch_drift=2e-5), trainer, long_prompts, prompts, FP32)
    assert "request alone vs in a batch of 11" in str(error)


def test_same_seed(hf_engine, trainer, prompts):
    check = suite.test_same_seed_same_rollouts
    check(None, SESSION, hf_engine, trainer, prompts, FP32)
    error = fails_with("seeded sampling", check, None, SESSION, FaultyEngine(hf_engine, unseeded=True), trainer, prompts, FP32)
    assert "sampled different tokens" in str(error)


def test_chunked_prefill(hf_engine, trainer, long_prompts):
    check = suite.test_chunked_prefill_matches_trainer

    def factory(engine):
        return lambda **kwargs: engine

    check(None, factory(FaultyEngine(hf_engine, chunk=CHUNK)), trainer, long_prompts, FP32)
    lossy = FaultyEngine(hf_engine, chunk=CHUNK, chunk_drift=1e-4)
    assert "64-token chunks" in str(fails_with("chunked prefill", check, None, factory(lossy), trainer, long_prompts, FP32))
    with pytest.raises(pytest.fail.Exception, match="chunked prefill did not happen: the engine prefills whole prompts"):
        check(None, factory(FaultyEngine(hf_engine)), trainer, long_prompts, FP32)
    with pytest.raises(pytest.fail.Exception, match="the engine prefills 512 tokens a step, the prompts have 271"):
        check(None, factory(FaultyEngine(hf_engine, chunk=512)), trainer, long_prompts, FP32)


def test_prefix_cache_hits(hf_engine, trainer, long_prompts):
    check = suite.test_prefix_cache_hits_match_a_cold_cache
    check(FaultyEngine(hf_engine, cache_drift=0.0), SESSION, trainer, long_prompts, FP32)
    error = fails_with("prefix caching", check, FaultyEngine(hf_engine, cache_drift=1e-4), SESSION, trainer, long_prompts, FP32)
    assert "prefix-cache hits (270+ cached tokens) vs trainer" in str(error)
    with pytest.raises(AssertionError, match=r"the prefix cache was not hit \(\[0, 0, 0\]\)"):
        check(hf_engine, SESSION, trainer, long_prompts, FP32)


@pytest.mark.parametrize("kwargs", [{"async_scheduling": True}, {"enforce_eager": False}], ids=["async_scheduling", "compiled"])
def test_runtime_modes(hf_engine, trainer, prompts, kwargs):
    check = suite.test_runtime_mode_matches_trainer

    def factory(engine):
        return lambda **_: engine

    check("cuda", SESSION, factory(hf_engine), trainer, prompts, FP32, kwargs, "")
    drifting = FaultyEngine(hf_engine, logprob_offset=1e-4)
    fails_with(", ".join(kwargs), check, "cuda", SESSION, factory(drifting), trainer, prompts, FP32, kwargs, "")
    # a mode the session engine already runs is judged by the session's checks: no second engine for it
    running = types.SimpleNamespace(**{**vars(SESSION), "engine_kwargs": dict(kwargs)})
    with pytest.raises(pytest.skip.Exception, match="the session engine runs with"):
        check("cuda", running, factory(drifting), trainer, prompts, FP32, kwargs, "")
