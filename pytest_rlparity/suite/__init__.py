"""The built-in parity suite: ``pytest --rlparity --pyargs pytest_rlparity.suite`` from any repository."""

from typing import Any

from pytest_rlparity.engines.vllm_worker import EXTENSION
from pytest_rlparity.model import CORPUS, tokens_of_length
from pytest_rlparity.scheduling import SESSION_ENGINE_GROUP

RL_ENGINE = {"enable_prefix_caching": True, "worker_extension_cls": EXTENSION}
"""The engine of the objective layer's RL loop and of the inference path's prefix-cache and update checks
(each test resets it to base weights): prefix caching on, as RL stacks run it, and the update extension
that pushes the trainer's tensors every step. Each loss is an xdist group of its own, so under
``pytest -n`` the three runs go side by side; in a serial run they and the path checks share one start."""

UPDATE_ENGINE = {**RL_ENGINE, "engine_core": "process"}
"""The engine of the requests in flight across an update: the RL engine with its core in a process of its
own, which vLLM needs for a ``wait`` pause (and an inline core never finishes the requests after an
``abort`` one). Only those checks use it: a process start is the suite's longest."""

SHARED_PREFIX = 2 * 128 + 14
"""Tokens the long prompts share: two prefix-cache blocks on CPU (128 tokens each; 16 on GPU) and some."""

CHUNK = 64
"""The chunked-prefill token budget: the long prompts (:data:`SHARED_PREFIX` and more) take five chunks."""

LONGEST_FIRST = (
    "in-flight-engine",
    "rl-engine-gspo",
    "rl-engine-grpo",
    "rl-engine-ppo",
    "path-engine",
    "lm-head-engines",
    "runtime-mode-engines",
    SESSION_ENGINE_GROUP,
    "chunked-prefill-engine",
    "fp8-engine",
    "transfer-engines",
    "batch-invariant-engines",
)
"""The suite's xdist groups (engine configurations), longest first as measured on one H100 with a warm
compile cache (docs/benchmarks.md): the in-flight checks' process start (36-44 s) and checks, each RL run
(55-64 s), the path checks (35-40 s), then lm_head's two engines and the runtime modes (about 10 s each)
and the session engine's many short checks (7 s). Under ``-n N --dist loadgroup`` workers take them in this order
(:mod:`pytest_rlparity.scheduling`)."""


def shared_prefix_prompts(tokenizer: Any) -> list[list[int]]:
    """Six prompts sharing a prefix of :data:`SHARED_PREFIX` tokens of the model's own tokenizer."""
    prefix = tokens_of_length(tokenizer, SHARED_PREFIX)
    return [prefix + tokenizer(f" {i} {s.split()[1]}", add_special_tokens=False).input_ids for i, s in enumerate(CORPUS[:6])]
