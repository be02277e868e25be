"""The pieces of the multi-GPU checks that run anywhere: rank-qualified skips, platforms per parallel
layout, why a weight-transfer backend cannot run, and the bit counting of the batch-invariant tier.
The GPU runs themselves are in tests/test_gpu.py."""

from __future__ import annotations

import pytest

from pytest_rlparity.engines.base import EngineInfo, skips_on
from pytest_rlparity.engines.vllm_transfer import unavailable
from pytest_rlparity.errors import ParityError
from pytest_rlparity.layers.bitwise import bit_difference, check_bitwise
from pytest_rlparity.checks import collecting


def test_rank_qualified_skips_apply_on_their_rank_only():
    skips = ["model.norm.", "tp1:model.layers.1.", "tp0:lm_head."]
    assert skips_on(0, skips) == ["model.norm.", "lm_head."]
    assert skips_on(1, skips) == ["model.norm.", "model.layers.1."]
    assert skips_on(2, skips) == ["model.norm."]


@pytest.mark.parametrize(
    ("kwargs", "platform"),
    [({}, "cuda-bfloat16"), ({"tensor_parallel_size": 2}, "cuda-bfloat16-tp2"),
     ({"tensor_parallel_size": 1, "pipeline_parallel_size": 2}, "cuda-bfloat16-pp2")],
)
def test_goldens_are_kept_per_parallel_layout(kwargs, platform):
    assert EngineInfo("vllm", "0.26.0", "cuda", "bfloat16", kwargs).platform == platform


def test_a_transfer_backend_that_cannot_run_says_why():
    assert "unknown weight-transfer backend 'gloo'" in unavailable("gloo")
    reason = unavailable("nccl", 2)
    assert reason is not None  # no machine running this suite's CPU job has 3 GPUs
    assert any(word in reason for word in ("CUDA", "3 GPUs", "weight-transfer API"))


def test_bits_are_counted_up_to_where_tokens_diverge():
    one_ulp = -2.5000002384185791  # the float32 after -2.5
    found = bit_difference("x", [[-1.0, -2.5, -3.0]], [[-1.0, one_ulp, -9.0]], [[5, 6, 7]], [[5, 6, 8]])
    assert (found.values, found.differing, found.bits, found.diverged) == (2, 1, 1, 1)
    assert not found.equal and bit_difference("y", [[-1.0]], [[-1.0]]).equal


def test_the_tier_fails_promised_paths_with_the_flag_and_only_reports_the_rest():
    differing = [
        bit_difference("batch 1 vs N", [[-1.0]], [[-1.5]]),
        bit_difference("request order", [[-1.0]], [[-1.0]]),
        bit_difference("chunked vs whole prefill", [[-1.0]], [[-1.25]]),
    ]
    published = []
    with collecting(lambda entry, _: published.append(entry)):
        check_bitwise(differing, invariant=False, label="control")
        with pytest.raises(ParityError, match=r"batch 1 vs N: 1 of 1 logprobs differ") as failure:
            check_bitwise(differing, invariant=True, label="tier")
    assert failure.value.cause == "batch invariance"
    assert "request order" not in str(failure.value) and "chunked" not in str(failure.value)
    assert [e["verdict"] for e in published] == ["pass", "fail"]
    assert published[0]["paths"][0]["differing"] == 1 and published[0]["paths"][2]["promised"] is False
