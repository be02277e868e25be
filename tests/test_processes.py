"""Which child processes are an engine's: what its close ends, and what it must leave alone."""

from __future__ import annotations

import operator
import subprocess
import sys

import pytest

from pytest_rlparity.engines.processes import ProcessGroup


def test_torch_compile_workers_are_not_taken_for_an_engines_processes():
    """An engine whose core runs inline starts torch inductor's compile pool, which the whole process
    shares: closing that engine must not end it, or the next engine to compile here waits forever."""
    subproc_pool = pytest.importorskip("torch._inductor.compile_worker.subproc_pool")
    group = ProcessGroup.mark()
    pool = subproc_pool.SubprocPool(2)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands for an engine core
    try:
        group.adopt_new()
        assert group.pids == {engine.pid}
        group.kill()
        assert engine.wait(timeout=10) is not None
        assert pool.process.poll() is None, "the compile pool was ended with the engine"
        assert pool.submit(operator.add, 1, 2).result(timeout=120) == 3
    finally:
        pool.shutdown()
        engine.kill()
