"""The parity session: one object per pytest run that owns engines, trainers, goldens and results.

Fixtures and hooks reach everything through it, so engines are shared across tests,
closed exactly once, and the end-of-session summary can order failures by layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, cast

from . import frameworks, results
from .config import Options
from .engines import registry
from .engines.base import ENGINE_CORE, Build, StartOptions
from .files import safe_name, write_atomic
from .golden import GoldenStore
from .layers import LAYER_DOC, LAYERS
from .numerics import Numerics, numerics_for
from .settings import SamplingSettings, Tolerance

if TYPE_CHECKING:
    from .compare import Comparison
    from .engines.base import Engine, EngineInfo
    from .engines.pool import EnginePool
    from .trainer.recompute import Trainer

Twin = Union[tuple[str, str], None, Literal["engine"]]
"""A trainer's precision twin: ``(dtype, head_dtype)``, none, or the engine's precision."""

@dataclass
class Outcome:
    """The result of one parity test, for the layered summary."""

    nodeid: str
    layer: str
    outcome: str
    cause: str | None = None
    headline: str = ""
    duration: float = 0.0
    """Seconds over set-up, call and teardown (engines start in set-up)."""
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """What the test's checks published (see :mod:`pytest_rlparity.results`)."""


class RLParitySession:
    """State shared by every parity test of a pytest run."""

    def __init__(self, options: Options, *, worker: bool = False) -> None:
        self.options = options
        self.worker = worker
        """Whether this is a pytest-xdist worker: it sees only its own tests; the controller sees all."""
        self.engine_class = registry.engine_class(options.engine)
        """The registered class of ``--rlparity-engine`` (:mod:`pytest_rlparity.engines.registry`)."""
        self.engine_kwargs = {**self.engine_class.default_kwargs, **options.engine_kwargs}
        self.outcomes: list[Outcome] = []
        self.engine_starts: list[dict[str, Any]] = []
        """Every engine start of the run, as test reports carry them (from every xdist worker)."""
        self._starts_taken = 0
        self.report_written: Path | None = None
        self.goldens = GoldenStore(
            options.golden_dir,
            options.update_goldens,
            update_hint="pytest --rlparity",
            migration=options.baseline,
        )
        self._trainers: dict[tuple[str, str, str, tuple[str, str] | None], Trainer] = {}

    @functools.cached_property
    def model_dir(self) -> Path:
        """The model under test: ``--rlparity-model`` or the embedded tiny model."""
        if self.options.model:
            return Path(self.options.model)
        from .model import embedded_model

        return embedded_model(self.options.model_seed)

    @functools.cached_property
    def head_check_model(self) -> Path:
        """The model of the lm_head precision check: yours, or the embedded model's large-logits variant."""
        if self.options.model:
            return self.model_dir
        from .model import LARGE_LOGITS, embedded_model

        return embedded_model(self.options.model_seed, variant=LARGE_LOGITS)

    @functools.cached_property
    def fingerprint(self) -> str:
        from .model import fingerprint

        return fingerprint(self.model_dir)

    @functools.cached_property
    def pool(self) -> EnginePool:
        from .engines.pool import EnginePool

        options = self.options
        return EnginePool(
            engine=self.engine_class,
            model=str(self.model_dir),
            base_kwargs=self.engine_kwargs,
            max_alive=options.max_engines,
            options=StartOptions(options.start_timeout, options.request_timeout, self.engine_core, options.server_url),
        )

    @property
    def engine_core(self) -> str:
        """Where vLLM engine cores run unless a check needs a process: ``--rlparity-engine-core``, or by
        device (inline on CPU, where it saves a 15 s re-import per start; processes on GPUs)."""
        if self.options.engine_core != "auto":
            return self.options.engine_core
        return "inline" if self.build.device == "cpu" else "process"

    def engine(self, **overrides: Any) -> Engine:
        """The engine with the session's kwargs plus ``overrides``, started on first use.

        Returns a handle that survives the pool closing the engine to make room.
        """
        self.pool.get(**overrides)  # start now, so start-up errors surface in the caller
        return cast("Engine", self.pool.handle(**overrides))

    def trainer(
        self, dtype: str = "float32", head_dtype: str | None = None, model_dir: Path | None = None, *, twin: Twin = "engine"
    ) -> Trainer:
        """The trainer holding the same weights, in ``dtype`` with an lm_head in ``head_dtype``, shared per configuration.

        ``twin``: the precision twin's ``(dtype, head_dtype)``; by default the engine's precision
        (:attr:`engine_precision`, none for an fp32 engine), which calibrated comparisons need.
        """
        key = (str(model_dir or self.model_dir), dtype, head_dtype or dtype, self._twin(twin))
        if key not in self._trainers:
            self._trainers[key] = self.new_trainer(Path(key[0]), dtype=key[1], head_dtype=key[2], twin=key[3])
        return self._trainers[key]

    def new_trainer(
        self, model_dir: Path | None = None, *, dtype: str = "float32", head_dtype: str | None = None, twin: Twin = "engine"
    ) -> Trainer:
        """A trainer of its own (for checks that change its weights), on the trainer device."""
        from .trainer.recompute import Trainer

        return Trainer(
            model_dir or self.model_dir, dtype=dtype, head_dtype=head_dtype or dtype, device=self.trainer_device,
            twin=self._twin(twin),
        )

    def _twin(self, twin: Twin) -> tuple[str, str] | None:
        return self.engine_precision if twin == "engine" else twin

    @property
    def engine_precision(self) -> tuple[str, str] | None:
        """(body dtype, lm_head dtype) of the engine when it runs in reduced precision; ``None`` in fp32."""
        if not self.numerics.reduced:
            return None
        overrides = self.engine_kwargs.get("hf_overrides") or {}
        return self.dtype, str(overrides.get("head_dtype") or self.dtype).removeprefix("torch.")

    @functools.cached_property
    def trainer_device(self) -> str:
        """``--rlparity-trainer-device``, else the engine's device: on a GPU runner the trainer shares the GPU."""
        return self.options.trainer_device or ("cuda" if self.build.device == "cuda" else "cpu")

    @property
    def dtype(self) -> str:
        return str(self.engine_kwargs.get("dtype", "float32")).removeprefix("torch.")

    @functools.cached_property
    def numerics(self) -> Numerics:
        """The engine dtype's bounds (:mod:`pytest_rlparity.numerics`)."""
        return numerics_for(self.dtype)

    def tolerance(self, dtype: str | None = None) -> Tolerance:
        """The engine-vs-trainer tolerance for ``dtype`` (the engine's by default), with the profile's overrides."""
        return numerics_for(dtype or self.dtype).tolerance.replace(**self.options.tolerance)

    def seeded(self, settings: SamplingSettings) -> SamplingSettings:
        """``settings`` with the suite's seed (``--rlparity-seed``) added: another seed is another clean draw."""
        if settings.seed is None or not self.options.seed:
            return settings
        return dataclasses.replace(settings, seed=settings.seed + self.options.seed)

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

    @functools.cached_property
    def build(self) -> Build:
        """The engine as installed and its device, known without starting an engine."""
        return self.engine_class.installed()

    def supports(self, capability: str) -> bool:
        """Whether the engine under test has ``capability`` (:mod:`pytest_rlparity.engines.base`)."""
        return capability in self.engine_class.capabilities

    @property
    def model_name(self) -> str:
        return self.options.model or f"embedded tiny-llama seed {self.options.model_seed}"

    def run_info(self) -> dict[str, Any]:
        """What this run is, for the JSON report (known without starting an engine)."""
        return {
            "engine": self.options.engine,
            "engine_version": self.build.name,
            "device": self.build.device,
            "engine_kwargs": self.engine_kwargs,
            "model": self.model_name,
            "model_fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "goldens": str(self.options.golden_dir),
            "golden_mode": "baseline (read-only, migration)" if self.options.baseline else self.options.update_goldens,
            "torch": _version("torch"),
            "plugin_version": _version("pytest-rlparity"),
            "python": platform.python_version(),
            "engine_starts": self.engine_starts,
            "engines_registered": registry.names(),
        }

    @contextlib.contextmanager
    def collecting(self, nodeid: str) -> Iterator[list[dict[str, Any]]]:
        """Collect what the checks of one test publish; a failing comparison also gets its plot."""
        entries: list[dict[str, Any]] = []

        def sink(entry: dict[str, Any], comparison: Comparison | None) -> None:
            if comparison is not None and entry.get("verdict") == "fail":
                from .plots import plot_comparison

                name = f"{safe_name(nodeid, limit=120)}-{len(entries)}.png"
                title = f"{nodeid.rsplit('::', 1)[-1]}: {entry.get('label', '')}"
                entry["plot"] = plot_comparison(comparison, title, str(self.artifact_path(name)))
            entries.append(entry)

        with results.collecting(sink):
            yield entries

    def write_report(self) -> Path | None:
        """The JSON report of the run (``rlparity_report``), written atomically."""
        if self.options.report is None or not self.outcomes:
            return None
        report = results.build_report(self.run_info(), self.outcomes, LAYERS)
        write_atomic(self.options.report, results.dump_report(report))
        self.report_written = self.options.report
        return self.report_written

    def header(self) -> list[str]:
        """The lines of the pytest report header."""
        options = self.options
        precision = self.engine_precision
        judged = (
            f"bounds scaled to the precision floor of a {precision[0]} trainer with a {precision[1]} lm_head"
            if precision
            else "absolute bounds"
        )
        lines = [
            f"rlparity: engine {options.engine} ({self.build.name}), device {self.build.device}, dtype {self.dtype} ({judged})",
            f"rlparity: model {self.model_name} ({self.model_dir}), fingerprint {self.fingerprint}",
            f"rlparity: engines registered: {', '.join(registry.names())} (--rlparity-engine)",
            f"rlparity: trainer on {self.trainer_device}, suite seed {options.seed}"
            + (f", engine core {self.engine_core}" if self.supports(ENGINE_CORE) else ""),
        ]
        if options.kwarg_sources:
            set_by = ", ".join(f"{k}={self.engine_kwargs[k]!r} ({src})" for k, src in options.kwarg_sources.items())
            lines.append(f"rlparity: engine kwargs set: {set_by}")
        mode = "baseline, read-only: engine and engine version may differ" if options.baseline else f"update: {options.update_goldens}"
        lines.append(f"rlparity: goldens {options.golden_dir} ({mode})")
        return lines

    def summary(self) -> list[str]:
        """Results grouped by layer, lowest first, with each failure's likely cause."""
        lines = []
        report = results.build_report({}, self.outcomes, LAYERS)
        for layer, row in report["layers"].items():
            lines.append(
                f"{layer:<15} {'FAILED' if row['failed'] else 'ok':<7} {row['passed']} passed, {row['failed']} failed, "
                f"{row['skipped']} skipped" + (f"  - {LAYER_DOC[layer]}" if layer in LAYER_DOC else "")
            )
            for test in report["tests"]:
                if test["layer"] != layer or test["outcome"] != "failed":
                    continue
                below = test["downstream_of"]
                downstream = f" (probably downstream of the failing {', '.join(below)} layer)" if below else ""
                cause = f" [{test['cause']}]" if test["cause"] else ""
                lines.append(f"    FAILED {test['nodeid']}{cause}{downstream}")
                if test["headline"]:
                    lines.append(f"        {test['headline']}")
                if test["advice"] and not below:
                    lines.append(f"        try: {test['advice']}")
                lines += [f"        plot: {c['plot']}" for c in test["checks"] if c.get("plot")]
        if report["frameworks"]:
            lines.append("RL frameworks' own mismatch metrics, engine vs trainer (semantic layer), against their alarm thresholds:")
            lines += frameworks.table(report["frameworks"])
        if self.engine_starts:
            secs = ", ".join(f"{s['seconds']:.1f}s" for s in self.engine_starts)
            workers = {s.get("worker") for s in self.engine_starts} - {None}
            lines.append(f"engine starts: {len(self.engine_starts)} ({secs})" + (f" on {len(workers)} workers" if len(workers) > 1 else ""))
        lines += self.floor_summary()
        goldens = [c for o in self.outcomes for c in o.checks if c.get("kind") == "golden"]
        lines += [c["note"] for c in goldens if c.get("note")]
        allowed = [c["allowed"] for c in goldens if c.get("allowed")]
        if allowed:
            lines.append(f"goldens: {len(allowed)} matched with allowed differences (details in the report), e.g. {allowed[0]}")
        plots = [c["plot"] for o in self.outcomes for c in o.checks if c.get("plot")]
        if plots:
            lines.append(f"plots: {len(plots)} PNG(s) in {self.options.artifacts_dir}")
        if self.report_written is not None:
            lines.append(f"report: {self.report_written}")
        return lines

    def floor_summary(self) -> list[str]:
        """One line on the checks scaled to the precision floor: how many, and the worst ratio of each statistic."""
        scaled = [(o.nodeid.rsplit("::", 1)[-1], c) for o in self.outcomes for c in o.checks if c.get("floor_ratios")]
        if not scaled:
            return []
        worst = []
        for stat in ("mean_abs", "k3_kl", "mean_offset"):
            name, check = max(scaled, key=lambda nc: nc[1]["floor_ratios"].get(stat, 0.0))
            worst.append(f"{stat} {check['floor_ratios'].get(stat, 0.0):.2f}x (bound {check['floor_factors'].get(stat, 0):g}x, {name})")
        return [f"precision floor: {len(scaled)} comparisons scaled to the model's own reduced-precision noise; worst " + "; ".join(worst)]

    def new_engine_starts(self, worker: str | None = None) -> list[dict[str, Any]]:
        """Engine starts since the last call, as plain data for a test report to carry to the controller."""
        if "pool" not in self.__dict__:
            return []
        fresh = self.pool.starts[self._starts_taken :]
        self._starts_taken = len(self.pool.starts)
        return [{"seconds": round(s.seconds, 1), "kwargs": results.jsonable(s.kwargs), "worker": worker} for s in fresh]

    def failures_below(self, layer: str) -> list[str]:
        """Failed tests of the layers under ``layer`` so far: what an objective failure is probably downstream of.

        A pytest-xdist worker knows only its own tests, so it names none (the controller's summary
        marks downstream failures from every worker's results)."""
        if self.worker:
            return []
        below = LAYERS[: LAYERS.index(layer)] if layer in LAYERS else LAYERS
        return [o.nodeid.rsplit("::", 1)[-1] for o in self.outcomes if o.layer in below and o.outcome == "failed"]

    def artifact_path(self, name: str) -> Path:
        """Where a run's plots go: ``<rootdir>/rlparity-artifacts/<name>``."""
        self.options.artifacts_dir.mkdir(parents=True, exist_ok=True)
        return self.options.artifacts_dir / name

    def close(self) -> None:
        if "pool" in self.__dict__:
            self.pool.close_all()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
