"""The stock suite on model families whose forward does more than ``lm_head(hidden)``, on real vLLM (CPU).

Gemma2 soft-caps its final logits, Granite divides them, Cohere multiplies them, GPT-J adds a head bias,
Qwen3 normalises queries and keys; Qwen3-MoE routes each token to 2 of 8 experts per layer, a path that
can differ between engine and trainer. A precision twin that applied the head itself was wrong by 0.08-67
nats on these shapes, and its floor-scaled bounds passed raw logprobs. Here each runs the semantic layer
with a bf16 engine and an fp32 lm_head: clean passes, and ``logprobs_mode=raw_logprobs`` fails naming
``logprobs_mode`` far beyond its bounds. The raw engine is judged in the same run, by a test of the kind a
user writes with the plugin's fixtures (the stock suite's own check on an engine with that one kwarg changed),
so each family costs one interpreter with torch and vLLM, not two.
"""

from __future__ import annotations

import json

import pytest

from pytest_rlparity.shapes import FAMILY_SHAPES, MOE_SHAPES

from tests.conftest import run_pytest

BF16_FP32_HEAD = ["--rlparity-engine-kwarg", "dtype=bfloat16", "--rlparity-engine-kwarg", 'hf_overrides={"head_dtype": "float32"}']
FAULT_MARGIN = 3.0
"""The raw-logprobs fault must break its worst-hit bound by at least this much (measured: 33x to 30000x k3)."""


SHAPES = {**FAMILY_SHAPES, "tiny-qwen3-moe": MOE_SHAPES["tiny-qwen3-moe"]}


@pytest.fixture(scope="module", params=sorted(SHAPES), ids=lambda name: name.removeprefix("tiny-"))
def family(request, tmp_path_factory):
    from pytest_rlparity.shapes import make_model

    name = request.param
    return make_model(tmp_path_factory.mktemp(name) / name, SHAPES[name], dtype="float32", text_bytes=200_000)


FP32 = ["--rlparity-engine-kwarg", "dtype=float32"]
"""The mixture-of-experts shape's precision: in bf16 the reference refuses it (routing flips, below)."""


RAW_LOGPROBS_FAULT = """
import pytest

from pytest_rlparity.layers.semantic import check_completions
from pytest_rlparity.suite.test_semantic import GRID

FAULT_CASES = [case for case in GRID if case.name in ("temperature", "top_k", "penalties")]


@pytest.mark.semantic
@pytest.mark.parametrize("case", FAULT_CASES, ids=lambda c: c.name)
def test_raw_logprobs_engine(case, rlparity_session, rlparity_engine_factory, rlparity_trainer, rlparity_prompts, rlparity_tolerance):
    engine = rlparity_engine_factory(logprobs_mode="raw_logprobs")
    settings = rlparity_session.seeded(case.settings)
    completions = engine.generate(rlparity_prompts, settings)
    recompute = rlparity_trainer.recompute(completions, settings)
    check_completions(completions, recompute, settings, rlparity_tolerance, tokenizer=rlparity_trainer.tokenizer).raise_if_failed()
"""
"""The stock check of sampled logprobs (``test_sampled_logprobs_match_trainer``) on an engine that returns raw
logprobs, where temperature, top-k or penalties make them differ from processed ones: every case must fail."""


def semantic_run(model, tmp_path):
    """The stock semantic layer on ``model`` (goldens written afresh), then the raw-logprobs fault cases."""
    report = tmp_path / "report.json"
    fault = tmp_path / "raw_logprobs_fault.py"
    fault.write_text(RAW_LOGPROBS_FAULT)
    precision = FP32 if "moe" in model.name else BF16_FP32_HEAD
    result = run_pytest(
        "-c", "pyproject.toml", "--rlparity", "-m", "semantic", "pytest_rlparity/suite", str(fault),
        f"--rlparity-model={model}", f"--rlparity-golden-dir={tmp_path / 'golden'}", "--rlparity-update-goldens",
        f"--rlparity-report={report}", *precision,
    )
    return result, json.loads(report.read_text()) if report.exists() else {}


def worst_over_bound(check):
    """The largest |statistic| / bound of a comparison (its bounds already scaled to the floor)."""
    tolerance, stats = check["tolerance"], check["stats"]
    return max(abs(stats[s]) / tolerance[s] for s in ("mean_abs", "mean_offset", "k3_kl", "prob_diff_mean") if tolerance.get(s))


def test_the_stock_semantic_layer_passes_clean_and_fails_raw_logprobs(family, tmp_path, no_leaked_engines):
    result, report = semantic_run(family, tmp_path)
    assert report, result.stdout[-3000:]
    assert report["run"]["dtype"] == ("float32" if "moe" in family.name else "bfloat16")
    stock = [t for t in report["tests"] if t["nodeid"].startswith("pytest_rlparity/suite/")]
    failed = [t for t in report["tests"] if t not in stock and t["outcome"] == "failed"]
    assert len(stock) == 16 and {t["outcome"] for t in stock} == {"passed"}, result.stdout[-3000:]  # EOS and stop cases forced, none skipped
    assert result.returncode == 1, result.stdout[-3000:]  # the fault cases alone
    assert len(failed) == 3 and {t["cause"] for t in failed} == {"logprobs_mode"}, [(t["nodeid"], t["cause"]) for t in report["tests"]]
    margins = [worst_over_bound(c) for t in failed for c in t["checks"] if c.get("kind") == "comparison" and c["verdict"] == "fail"]
    assert margins and min(margins) >= FAULT_MARGIN, margins


def test_a_bf16_mixture_of_experts_is_judged_only_with_its_routes_replayed(tmp_path_factory, tmp_path, no_leaked_engines):
    """The bf16 twin of the MoE shape routes some tokens to other experts than fp32 does (7 of 304 decisions), and
    a flipped route moves logprobs by nats: checks that compare on the trainer's own routes get no verdict, one
    reason, and start no engine; the MoE routing check, which replays the engine's routes, runs and passes
    (the twin's floor with the fp32 routes replayed is sound)."""
    from pytest_rlparity.shapes import make_model

    model = make_model(tmp_path_factory.mktemp("moe") / "tiny-qwen3-moe", SHAPES["tiny-qwen3-moe"], dtype="float32", text_bytes=200_000)
    report = tmp_path / "report.json"
    result = run_pytest(
        "--rlparity", f"--rlparity-model={model}", "-k", "greedy or teacher or moe_routing", f"--rlparity-report={report}", *BF16_FP32_HEAD
    )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "RoutingReferenceError: Qwen3MoeForCausalLM routes each token to experts" in result.stdout
    assert "token-layer decisions" in result.stdout and "Only the MoE routing check" in result.stdout
    outcomes = {t["nodeid"].split("::")[-1]: t["outcome"] for t in json.loads(report.read_text())["tests"]}
    assert outcomes.pop("test_moe_routing_matches_trainer") == "passed", outcomes
    assert set(outcomes.values()) == {"failed"}, outcomes  # in setup, by the refusal above


def test_routing_replay_is_exact_and_brings_a_bf16_twin_back_to_precision_noise(tmp_path):
    """The mechanism a reduced-precision MoE verdict needs: the fp32 trainer replaying its own routes computes
    what it computes alone, bit for bit; the bf16 twin replaying the fp32 routes is left with rounding only."""
    from pytest_rlparity.compare import precision_floor
    from pytest_rlparity.model import CORPUS
    from pytest_rlparity.settings import check_floor
    from pytest_rlparity.shapes import make_model
    from pytest_rlparity.trainer.recompute import Trainer

    model = make_model(tmp_path / "moe", SHAPES["tiny-qwen3-moe"], dtype="float32", text_bytes=200_000)
    trainer = Trainer(model, twin=("bfloat16", "float32"))
    sequences = [trainer.tokenizer(s).input_ids for s in CORPUS]
    full = trainer.score(sequences)
    routes = [trainer.expert_choices(seq) for seq in sequences]
    own, replayed = trainer.score_on_routes(sequences, routes), trainer.twin.score_on_routes(sequences, routes)
    assert own == full
    alone, shared = precision_floor(trainer.twin.score(sequences), full), precision_floor(replayed, full)
    assert shared["k3_kl"] * 10 < alone["k3_kl"] and shared["max_abs"] * 5 < alone["max_abs"], (alone, shared)
    check_floor(shared)  # within what reduced precision explains
