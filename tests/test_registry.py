"""Engines by name: the built-in ones, a third party's, and a clear error for a name nobody registered."""

from __future__ import annotations

import pytest

from pytest_rlparity.engines import registry
from pytest_rlparity.errors import EngineError


def test_the_builtin_engines_are_registered_and_import():
    assert registry.names()[:3] == ["vllm", "vllm-server", "hf"]
    for name in ("vllm", "vllm-server", "hf"):
        cls = registry.engine_class(name)
        assert cls.name == name and isinstance(cls.default_kwargs, dict) and isinstance(cls.capabilities, frozenset)
        assert cls.installed().device in ("cpu", "cuda", "unknown")


def test_an_unknown_name_lists_the_registered_engines():
    with pytest.raises(EngineError, match=r"no engine named 'sglang'; registered: vllm, vllm-server, hf"):
        registry.engine_class("sglang")


def test_a_registration_that_does_not_import_says_so(monkeypatch):
    monkeypatch.setattr(registry, "_added", {"broken": "not_a_module:Engine"})
    with pytest.raises(EngineError, match=r"engine 'broken' is registered as 'not_a_module:Engine', which does not import"):
        registry.engine_class("broken")


def test_an_engine_registered_in_a_conftest_runs_the_parity_fixtures(pytester):
    """A team's own engine without forking: one class, one register_engine call."""
    pytester.makeconftest(
        """
        from pytest_rlparity.engines.hf import HFEngine
        from pytest_rlparity.engines.registry import register_engine

        class TeamEngine(HFEngine):
            name = "team"

        register_engine("team", TeamEngine)
        """
    )
    pytester.makepyfile(
        """
        import pytest
        from pytest_rlparity.settings import SamplingSettings

        @pytest.mark.semantic
        def test_it(rlparity_engine, rlparity_prompts):
            assert len(rlparity_engine.generate(rlparity_prompts[:1], SamplingSettings(max_tokens=2))[0].token_ids) == 2
        """
    )
    result = pytester.runpytest("--rlparity", "--rlparity-engine", "team", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["rlparity: engine team (transformers *", "rlparity: engines registered: vllm, vllm-server, hf, team *"])


def test_an_unknown_engine_on_the_command_line_is_a_usage_error(pytester):
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--rlparity", "--rlparity-engine", "sglang", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--rlparity-engine: no engine named 'sglang'; registered: vllm, vllm-server, hf*"])
