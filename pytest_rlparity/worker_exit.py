"""How a pytest-xdist worker of a parity run ends: its exit handlers run, the interpreter's teardown does not.

With torch and vLLM imported, Python's own teardown (clearing every module, the last garbage
collections) takes seconds after the session has ended and every exit handler has run: 1.8 s for
``import torch, vllm, transformers`` alone on a 2-core CPU, 2.5-3.3 s for a worker of the GPU suite
on an H100. pytest-xdist's controller waits for each worker's process to end, so the last
worker's teardown is the run's last seconds, which nothing overlaps. Once its session is over
(engines closed, results sent), a worker of a ``--rlparity`` run therefore ends with ``os._exit``
after the exit handlers: those registered after this module (vLLM's, torch's, a test's) run first,
as atexit runs them last-in first-out; those of the standard library that may have been
registered before it (weakref finalizers, multiprocessing's, logging's) it runs itself. What is
skipped is what Python never promises at exit: ``__del__`` of objects still alive.

ini ``rlparity_worker_exit = full`` keeps the interpreter's teardown (e.g. for a coverage tool
that saves its data in an exit handler registered before pytest loaded this plugin).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import weakref

_armed = False


def arm() -> None:
    """End this process at exit without the interpreter's teardown (a worker whose session is over)."""
    global _armed
    _armed = True


@atexit.register
def _end_now() -> None:
    if not _armed:
        return
    from .engines.processes import kill_all  # its own exit handler may come after this one

    kill_all()
    weakref.finalize._exitfunc()  # type: ignore[attr-defined]  # finalizers marked atexit, as at any exit
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util._exit_function()  # type: ignore[attr-defined]  # children joined or ended, finalizers run
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
