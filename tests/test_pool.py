"""Which configurations share an engine, and which engines the pool closes, with fake engines (the real
failure each rule prevents is shown on vLLM in test_vllm_cpu)."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

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


def test_a_released_configuration_closes_and_starts_again_when_asked():
    pool = EnginePool(FakeEngine, "m", {}, options=StartOptions(engine_core="inline"))
    process, inline = pool.get(engine_core="process"), pool.get()
    pool.release(engine_core="process")
    pool.close_all()  # waits for the background close
    assert process.closed and inline.closed
    pool.release(engine_core="process")  # nothing running with it: nothing to do
    again = pool.get(engine_core="process")
    assert again is not process and not again.closed and len(pool.starts) == 3


class SlowToClose(FakeEngine):
    """Its close waits until the test lets it finish, as a process core's shutdown waits on its processes."""

    finish = threading.Event()

    def close(self) -> None:
        self.closing = threading.current_thread()
        assert self.finish.wait(10), "the test never let the close finish"
        super().close()


def test_a_process_core_closes_in_the_background_and_the_sessions_end_waits_for_it():
    """Releasing a process-core engine returns before its shutdown ends, so the next checks overlap it; an
    inline engine closes in the caller's thread (its close tears down state the next inline start shares),
    and ``close_all`` returns only once every background close has ended."""
    SlowToClose.finish.clear()
    pool = EnginePool(SlowToClose, "m", {}, options=StartOptions(engine_core="inline"))
    process = pool.get(engine_core="process")
    pool.release(engine_core="process")
    assert not process.closed and process.closing is not threading.current_thread()
    ended = threading.Event()
    session_end = threading.Thread(target=lambda: (pool.close_all(), ended.set()))
    session_end.start()
    assert not ended.wait(0.2), "close_all returned while a background close was still running"
    SlowToClose.finish.set()
    session_end.join(10)
    assert ended.is_set() and process.closed
    inline = pool.get()
    pool.release()
    assert inline.closed and inline.closing is threading.current_thread()


def test_a_start_of_another_model_names_it_so_that_it_is_no_duplicate_of_the_sessions():
    pool = EnginePool(engine=FakeEngine, model="session-model", base_kwargs={"dtype": "bfloat16"})
    pool.get()
    pool.get(model="large-logits")
    assert [start.kwargs for start in pool.starts] == [
        {"dtype": "bfloat16", "engine_core": "process"},
        {"dtype": "bfloat16", "engine_core": "process", "model": "large-logits"},
    ]
