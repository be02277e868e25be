"""The built-in parity suite: ``pytest --rlparity --pyargs pytest_rlparity.suite`` from any repository."""

from pytest_rlparity.engines.vllm_worker import EXTENSION

UPDATE_ENGINE = {"enable_prefix_caching": True, "worker_extension_cls": EXTENSION, "engine_core": "process"}
"""The engine that takes weight updates: the inference path's update checks and the objective layer's RL
loop (tests reset it to base weights). Prefix caching is on, as RL stacks run it; the update extension
pushes tensors; its core runs in a process of its own, which a ``wait`` pause needs. In a serial run the
layers share one start; under ``pytest -n`` each xdist group starts its own."""
