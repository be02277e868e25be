"""Which configurations share an engine, and which engines the pool closes, with fake engines (the real
failure each rule prevents is shown on vLLM in test_vllm_cpu)."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest

from pytest_rlparity.engines.base import ENGINE_CORE, HTTP, StartOptions
from pytest_rlparity.engines.pool import EnginePool


class FakeEngine:
    capabilities: ClassVar[frozenset[str]] = frozenset({ENGINE_CORE})

    def __init__(self, kwargs: dict[str, Any], core: str) -> None:
        self.kwargs, self.core, self.closed = kwargs, core, False

    @classmethod
    def start(cls, model: str, kwargs: dict[str, Any], options: StartOptions) -> FakeEngine:
        return cls(kwargs, options.engine_core)

    def close(self) -> None:
        self.closed = True
        self.closed_in = threading.current_thread()


class FakeServer(FakeEngine):
    capabilities: ClassVar[frozenset[str]] = frozenset({HTTP})


def test_an_inline_engine_starts_only_once_the_other_inline_ones_are_closed():
    pool = EnginePool(FakeEngine, "m", {}, max_alive=3, options=StartOptions(engine_core="inline"))
    first = pool.get()
    process = pool.get(engine_core="process")
    assert not first.closed  # a process-core start leaves the inline engine running
    second = pool.get(seed=1)
    assert first.closed and not process.closed and not second.closed
    assert pool.get(engine_core="process") is process


def test_where_no_engine_core_can_be_chosen_one_engine_serves_both():
    pool = EnginePool(FakeServer, "m", {}, options=StartOptions(engine_core="inline"))
    assert pool.get(prefix=True) is pool.get(prefix=True, engine_core="process")
    assert len(pool.starts) == 1 and "engine_core" not in pool.starts[0].kwargs


def test_at_the_end_engines_with_processes_of_their_own_close_beside_the_inline_one():
    """A process core's graceful shutdown waits on its processes: it runs in a thread of its own while the
    inline engine, whose close tears down this process's state, closes in the calling thread."""
    pool = EnginePool(FakeEngine, "m", {}, max_alive=3, options=StartOptions(engine_core="inline"))
    engines = [pool.get(engine_core="process"), pool.get(), pool.get(seed=1, engine_core="process")]
    pool.close_all()
    assert all(e.closed for e in engines) and pool.get(seed=2) not in engines
    here = threading.current_thread()
    assert [e.closed_in is here for e in engines] == [False, True, False]
    assert engines[0].closed_in is not engines[2].closed_in


def test_an_engine_that_fails_to_close_fails_the_close_after_the_others_are_closed():
    class Stuck(FakeEngine):
        def close(self) -> None:
            super().close()
            if self.core == "process":
                raise RuntimeError("shutdown failed")

    pool = EnginePool(Stuck, "m", {}, options=StartOptions(engine_core="inline"))
    engines = [pool.get(engine_core="process"), pool.get()]
    with pytest.raises(RuntimeError, match="shutdown failed"):
        pool.close_all()
    assert all(e.closed for e in engines)
