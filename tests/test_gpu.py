"""Past one GPU: tensor parallelism, vLLM's weight-transfer engines, the batch-invariant tier, and vLLM's own
returned MoE routes on a real MoE shape.

Skipped without CUDA GPUs and vLLM built for them. On a machine with two GPUs:

    pytest tests/test_gpu.py
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 pytest tests/test_gpu.py -k ipc   # the ipc transfer (ray installed)
    RLPARITY_CONTROL_MODEL=DIR pytest tests/test_gpu.py -k batch_invariant # the tier's control on a real shape

Engines run the GPU profile (``profiles/gpu-bf16.toml``: bf16, compiled, fp32 lm_head) and are
judged against the fp32 trainer with the bf16 numerics, as the suite judges them.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch

from pytest_rlparity.engines.base import StartOptions
from pytest_rlparity.engines.vllm import VLLMEngine
from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS, installed_build
from pytest_rlparity.engines.vllm_transfer import unavailable
from pytest_rlparity.engines.vllm_worker import EXTENSION
from pytest_rlparity.layers.bitwise import FLAG, PROMISED
from pytest_rlparity.layers.weight_updates import check_after_update
from pytest_rlparity.numerics import numerics_for
from pytest_rlparity.settings import SamplingSettings
from pytest_rlparity.trainer.recompute import Trainer
from tests.conftest import REPO, run_pytest
from tests.test_inference_path_faults import GREEDY, causes, step

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(
    GPUS == 0 or installed_build().device != "cuda", reason="needs a CUDA GPU and vLLM built for CUDA"
)

PROFILE = tomllib.loads((REPO / "profiles" / "gpu-bf16.toml").read_text())["engine_kwargs"]
BF16 = numerics_for("bfloat16").tolerance
SAMPLED = SamplingSettings(temperature=0.8, top_k=40, max_tokens=24, seed=0)


def gpu_kwargs(**overrides):
    return {**DEFAULT_KWARGS, **PROFILE, "enable_prefix_caching": True, "worker_extension_cls": EXTENSION, **overrides}


@pytest.fixture(scope="module")
def gpu_policy(tiny_model):
    """The fp32 trainer with a twin in the engine's precision (bf16 body, fp32 head): the calibrated floor."""
    return Trainer(tiny_model, device="cuda", twin=("bfloat16", "float32"))


@pytest.fixture
def policy(gpu_policy, tiny_model):
    gpu_policy.load_state(Trainer(tiny_model).state())
    return gpu_policy


@pytest.fixture(scope="module")
def tp2(tiny_model):
    if GPUS < 2:
        pytest.skip(f"tensor parallelism 2 needs 2 GPUs; {GPUS} visible")
    with VLLMEngine.start(str(tiny_model), gpu_kwargs(tensor_parallel_size=2)) as engine:
        yield engine


def update_and_check(engine, policy, prompts, tmp_path, history, **update):
    """One optimizer step pushed into ``engine``; the after-update check with the engine's checksums as witness."""
    before = engine.weight_checksums()
    engine.update_weights(step(policy, prompts, tmp_path, history), **update)
    engine.reset_prefix_cache()
    return check_after_update(engine, policy, history, prompts, GREEDY, BF16, checksums=(before, engine.weight_checksums()))


class TestTensorParallel:
    def test_platform_names_the_layout(self, tp2):
        assert tp2.info.platform == "cuda-bfloat16-tp2"

    def test_updates_reach_both_ranks(self, tp2, policy, tiny_model, prompts, tmp_path):
        tp2.update_weights(str(tiny_model))
        history = [policy.state()]
        for _ in range(2):
            report = update_and_check(tp2, policy, prompts, tmp_path, history, method="reload_tensors")
            assert report.ok, report.message()

    def test_one_rank_left_stale_is_named_with_its_rank(self, tp2, policy, tiny_model, prompts, tmp_path):
        tp2.update_weights(str(tiny_model))
        history = [policy.state()]
        report = update_and_check(
            tp2, policy, prompts, tmp_path, history, method="reload_tensors", skip_prefixes=["tp1:model.layers.1."]
        )
        assert "partial update" in causes(report), report.message()
        witness = next(f.message for f in report.findings if "checksums" in f.message)
        assert "tp1" in witness and "model.layers.1." in witness and "tp0" not in witness, witness


@pytest.mark.parametrize("backend,tp", [("nccl", 1), ("ipc", 1), ("nccl", 2), ("ipc", 2)])
def test_weight_transfer_clean_and_with_a_skipped_tensor(backend, tp, tiny_model, policy, prompts, tmp_path):
    """vLLM's weight-transfer API from trainer GPU memory: clean updates pass, a tensor left out is a partial update."""
    reason = unavailable(backend, tp)
    if reason is not None:
        pytest.skip(reason)
    kwargs = gpu_kwargs(tensor_parallel_size=tp, weight_transfer_config={"backend": backend})
    with VLLMEngine.start(str(tiny_model), kwargs, StartOptions(engine_core="process")) as engine:
        history = [policy.state()]
        report = update_and_check(engine, policy, prompts, tmp_path, history, method="transfer")
        assert report.ok, report.message()
        report = update_and_check(engine, policy, prompts, tmp_path, history, method="transfer", skip_prefixes=["model.layers.1.mlp."])
        assert "partial update" in causes(report), report.message()
        assert "model.layers.1." in report.findings[0].message  # the fused gate_up and down projections


CONTROL_MODEL = os.environ.get("RLPARITY_CONTROL_MODEL")
"""A realistic local model for the batch-invariant tier and its control; the embedded model by default."""


def test_batch_invariant_tier_passes_and_the_control_shows_differences(tmp_path, tiny_model):
    """The tier's suite test with ``VLLM_BATCH_INVARIANT=1`` (0 differing bits where vLLM promises them), and the
    same measurement in this process without the flag, where batching must change some bits."""
    from pytest_rlparity.model import corpus_prompts
    from pytest_rlparity.suite import shared_prefix_prompts
    from pytest_rlparity.suite.test_batch_invariance import measure_paths

    model = Path(CONTROL_MODEL or tiny_model)
    report_path = tmp_path / "report.json"
    result = run_pytest(
        "--rlparity", "pytest_rlparity/suite/test_batch_invariance.py", "--rlparity-profile", "profiles/gpu-bf16.toml",
        f"--rlparity-model={model}", f"--rlparity-report={report_path}", "-s", env={FLAG: "1"},
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    on = [c for t in json.loads(report_path.read_text())["tests"] for c in t.get("checks", []) if c.get("kind") == "bitwise"]
    print("with the flag:", json.dumps(on, indent=1))

    assert os.environ.get(FLAG) != "1", "the control needs this process without the flag"
    engines = []

    def factory(engine_core="process", **overrides):
        engines.append(VLLMEngine.start(str(model), gpu_kwargs(**overrides), StartOptions(engine_core=engine_core)))
        return engines[-1]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts = corpus_prompts(tokenizer)[:6]
    long_prompts = shared_prefix_prompts(tokenizer)
    try:
        off = measure_paths(factory, prompts, long_prompts)
    finally:
        for engine in engines:
            engine.close()
    print("without the flag:", [d.check_entry() for d in off])
    if not any(not d.equal for d in off if d.path in PROMISED):
        if CONTROL_MODEL is None:
            pytest.xfail(
                "on the embedded 2-layer model batching changes no bits even without the flag (H200, vLLM 0.26.0: 0 of 96 "
                "logprobs, 1 vs 102 requests), so the control cannot show the flag's effect; set RLPARITY_CONTROL_MODEL"
            )
        pytest.fail(f"batching changes no bits of {model} without {FLAG}: the control shows nothing")


def test_an_inline_engine_starts_after_the_one_before_it_closed(tiny_model, prompts):
    """The pool keeps one inline engine alive at a time, so a worker starts the next once the last has closed:
    the new one must capture its CUDA graphs, though vLLM keeps one graph pool per process."""
    for prefix_caching in (True, False):
        kwargs = gpu_kwargs(enable_prefix_caching=prefix_caching)
        with VLLMEngine.start(str(tiny_model), kwargs, StartOptions(engine_core="inline")) as engine:
            assert all(c.token_ids for c in engine.generate(prompts, GREEDY))


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """Qwen3-30B-A3B's layout at 1.2B parameters (64 experts, 8 per token), or ``RLPARITY_MOE_MODEL``."""
    from pytest_rlparity.shapes import MOE_SHAPES, make_model

    if os.environ.get("RLPARITY_MOE_MODEL"):
        return Path(os.environ["RLPARITY_MOE_MODEL"])
    return make_model(tmp_path_factory.mktemp("moe") / "qwen3-moe-1b", MOE_SHAPES["qwen3-moe-1b"], dtype="bfloat16")


def test_moe_routes_vllm_returns_agree_replay_and_a_perturbed_router_fails(moe_model, tmp_path, record_property):
    """vLLM's returned routes (``enable_return_routed_experts``) on a real MoE shape in bf16: the clean engine
    routes within what the twin's own flips allow and, replayed, scores within the bf16 bounds; a perturbed
    router fails with cause ``moe routing``. The numbers go to the junit properties and stdout."""
    from pytest_rlparity.engines.faults import perturbed_router
    from pytest_rlparity.layers.causes import MOE_ROUTING
    from pytest_rlparity.layers.moe_routing import check_routing
    from pytest_rlparity.model import corpus_prompts
    from tests.test_moe_routing import PERTURBATION

    trainer = Trainer(moe_model, device="cuda", twin=("bfloat16", "float32"))
    prompts = corpus_prompts(trainer.tokenizer)
    results = {}
    engines = {"clean": moe_model, "perturbed": perturbed_router(moe_model, tmp_path / "perturbed", scale=PERTURBATION)}
    for name, model in engines.items():
        with VLLMEngine.start(str(model), gpu_kwargs(enable_return_routed_experts=True)) as engine:
            completions = engine.generate(prompts, SAMPLED)
            sequences = [c.prompt_ids + c.token_ids for c in completions]
            routes, scores = engine.expert_routes(sequences), engine.score(sequences)
        results[name] = check_routing(routes, scores, trainer.routing_reference(sequences, routes), BF16, label=f"{name} MoE routes")
        record_property(name, results[name].note)
        print(f"{name}: {results[name].note}\n{results[name].message()}")
    assert results["clean"].ok, results["clean"].message()
    assert [f.cause for f in results["perturbed"].findings] == [MOE_ROUTING], results["perturbed"].message()
