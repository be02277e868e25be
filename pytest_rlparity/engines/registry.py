"""Engines by name. Adding an engine is one module plus one line in :data:`BUILTIN`; a third
party registers its own through the ``pytest_rlparity.engines`` entry point group, or by
calling :func:`register_engine` from a ``conftest.py``.

Names map to ``"module:Class"`` strings, so listing the engines imports none of them.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from ..errors import EngineError
from .base import EngineClass

BUILTIN: dict[str, str] = {
    "vllm": "pytest_rlparity.engines.vllm:VLLMEngine",
    "vllm-server": "pytest_rlparity.engines.vllm_server:VLLMServerEngine",
    "hf": "pytest_rlparity.engines.hf:HFEngine",
}
"""The engines that ship with the plugin: vLLM in-process, vLLM's OpenAI-compatible server, and
the transformers reference engine."""

ENTRY_POINTS = "pytest_rlparity.engines"
"""Entry point group for engines of other packages: ``name = "package.module:Class"``."""

_added: dict[str, str | type] = {}


def register_engine(name: str, engine: str | type) -> None:
    """Make ``--rlparity-engine NAME`` start ``engine``: a class implementing
    :class:`~.base.EngineClass` (and the :class:`~.base.Engine` protocol), or its ``"module:Class"``.

    Call it from a ``conftest.py`` at import time, before pytest configures the plugin.
    """
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"engine name {name!r}: use a non-empty name without spaces")
    _added[name] = engine


def names() -> list[str]:
    """Every registered engine name: built in, from entry points, then registered by hand."""
    found = dict.fromkeys(BUILTIN)
    found.update(dict.fromkeys(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)))
    found.update(dict.fromkeys(_added))
    return list(found)


def engine_class(name: str) -> type[EngineClass]:
    """The class registered as ``name``; an :class:`EngineError` listing the names if there is none."""
    target: str | type | None = _added.get(name)
    if target is None:
        target = next((ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINTS) if ep.name == name), None)
    if target is None:
        target = BUILTIN.get(name)
    if target is None:
        raise EngineError(f"no engine named {name!r}; registered: {', '.join(names())}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise EngineError(f"engine {name!r} is registered as {target!r}, which does not import: {exc}") from exc
    return target  # type: ignore[return-value]
