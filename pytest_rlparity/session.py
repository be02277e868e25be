"""The parity session: one object per pytest run that owns its resources.

The engines, trainers, model, numerics and goldens of a run; fixtures and hooks reach them
through it, so engines are shared across tests and closed exactly once. What the run found is
its :class:`~pytest_rlparity.record.RunRecord` (``session.record``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, cast

from .config import Options
from .engines import registry
from .engines.base import ENGINE_CORE, Build, StartOptions
from .files import jsonable
from .golden import GoldenStore
from .numerics import Numerics, numerics_for
from .record import RunRecord
from .settings import SamplingSettings, Tolerance

if TYPE_CHECKING:
    from .engines.base import Engine, EngineInfo
    from .engines.pool import EnginePool
    from .trainer.recompute import Trainer

Twin = Union[tuple[str, str], None, Literal["engine"]]
"""A trainer's precision twin: ``(dtype, head_dtype)``, none, or the engine's precision."""

class RLParitySession:
    """State shared by every parity test of a pytest run."""

    def __init__(self, options: Options, *, worker: bool = False) -> None:
        self.options = options
        self.worker = worker
        """Whether this is a pytest-xdist worker: it sees only its own tests; the controller sees all."""
        self.engine_class = registry.engine_class(options.engine)
        """The registered class of ``--rlparity-engine`` (:mod:`pytest_rlparity.engines.registry`)."""
        self.engine_kwargs = {**self.engine_class.default_kwargs, **options.engine_kwargs}
        self.record = RunRecord(options, worker=worker)
        """What the run found, and the summary and report that tell it."""
        self._starts_taken = 0
        self.goldens = GoldenStore(
            options.golden_dir,
            options.update_goldens,
            update_hint="pytest --rlparity",
            migration=options.baseline,
        )
        self._trainers: dict[tuple[str, str, str, tuple[str, str] | None], Trainer] = {}
        self._reference: str | BaseException | None = None
        """``"checked"``, or the error of the reference check (:meth:`check_reference`); ``None`` before it."""

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
        """Where vLLM engine cores run unless a check needs a process: ``--rlparity-engine-core``; ``auto``
        is inline, the fast path on CPU (a spawned core re-imports torch and vLLM: 15 s a start) and on
        GPUs (docs/benchmarks.md)."""
        return "inline" if self.options.engine_core == "auto" else self.options.engine_core

    def engine(self, *, replaying_routes: bool = False, **overrides: Any) -> Engine:
        """The engine with the session's kwargs plus ``overrides``, started on first use.

        Returns a handle that survives the pool closing the engine to make room. ``replaying_routes``: the
        caller replays the engine's MoE routes in the trainer (see :meth:`check_reference`).
        """
        self.check_reference(replaying_routes=replaying_routes)
        self.pool.get(**overrides)  # start now, so start-up errors surface in the caller
        return cast("Engine", self.pool.handle(**overrides))

    def trainer(
        self,
        dtype: str = "float32",
        head_dtype: str | None = None,
        model_dir: Path | None = None,
        *,
        twin: Twin = "engine",
        replaying_routes: bool = False,
    ) -> Trainer:
        """The trainer holding the same weights, in ``dtype`` with an lm_head in ``head_dtype``, shared per configuration.

        ``twin``: the precision twin's ``(dtype, head_dtype)``; by default the engine's precision
        (:attr:`engine_precision`, none for an fp32 engine), which calibrated comparisons need.
        """
        self.check_reference(replaying_routes=replaying_routes)
        key = (str(model_dir or self.model_dir), dtype, head_dtype or dtype, self._twin(twin))
        if key not in self._trainers:
            self._trainers[key] = self.new_trainer(Path(key[0]), dtype=key[1], head_dtype=key[2], twin=key[3])
        return self._trainers[key]

    def check_reference(self, *, replaying_routes: bool = False) -> None:
        """Check the reference every verdict rests on (the fp32 trainer and its precision twin,
        :meth:`Trainer.check_reference`) once per process, before the first engine starts; a
        failure is raised again at every later use, so no test is judged against it. A reduced-precision
        mixture-of-experts reference (:class:`~pytest_rlparity.errors.RoutingReferenceError`) is sound for a
        caller ``replaying_routes`` only: the MoE routing check."""
        if self._reference is None:
            from .errors import ReferenceCheckError
            from .model import CORPUS

            key = (str(self.model_dir), "float32", "float32", self._twin("engine"))
            trainer = self._trainers.get(key) or self.new_trainer()
            self._trainers[key] = trainer
            try:
                trainer.check_reference([trainer.tokenizer(s).input_ids for s in CORPUS[:4]])
                self._reference = "checked"
            except ReferenceCheckError as error:
                self._reference = error
        if isinstance(self._reference, BaseException):
            from .errors import RoutingReferenceError

            if not (replaying_routes and isinstance(self._reference, RoutingReferenceError)):
                raise self._reference

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
            "engine_starts": self.record.engine_starts,
            "engines_registered": registry.names(),
        }

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

    def new_engine_starts(self, worker: str | None = None) -> list[dict[str, Any]]:
        """Engine starts since the last call, as plain data for a test report to carry to the controller."""
        if "pool" not in self.__dict__:
            return []
        fresh = self.pool.starts[self._starts_taken :]
        self._starts_taken = len(self.pool.starts)
        return [{"seconds": round(s.seconds, 1), "kwargs": jsonable(s.kwargs), "worker": worker} for s in fresh]

    def close(self) -> None:
        if "pool" in self.__dict__:
            self.pool.close_all()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
