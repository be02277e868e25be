"""The built-in parity suite: ``pytest --rlparity --pyargs pytest_rlparity.suite`` from any repository."""

from typing import Any

from pytest_rlparity.engines.vllm_worker import EXTENSION
from pytest_rlparity.model import CORPUS, tokens_of_length

UPDATE_ENGINE = {"enable_prefix_caching": True, "worker_extension_cls": EXTENSION, "engine_core": "process"}
"""The engine that takes weight updates: the inference path's update checks and the objective layer's RL
loop (tests reset it to base weights). Prefix caching is on, as RL stacks run it; the update extension
pushes tensors; its core runs in a process of its own, which a ``wait`` pause needs. In a serial run the
layers share one start; under ``pytest -n`` each xdist group starts its own."""

SHARED_PREFIX = 2 * 128 + 14
"""Tokens the long prompts share: two prefix-cache blocks on CPU (128 tokens each; 16 on GPU) and some."""

CHUNK = 64
"""The chunked-prefill token budget: the long prompts (:data:`SHARED_PREFIX` and more) take five chunks."""


def shared_prefix_prompts(tokenizer: Any) -> list[list[int]]:
    """Six prompts sharing a prefix of :data:`SHARED_PREFIX` tokens of the model's own tokenizer."""
    prefix = tokens_of_length(tokenizer, SHARED_PREFIX)
    return [prefix + tokenizer(f" {i} {s.split()[1]}", add_special_tokens=False).input_ids for i, s in enumerate(CORPUS[:6])]
