"""Engine processes never outlive the test session.

An engine like vLLM spawns an EngineCore and worker processes. :class:`ProcessGroup`
records which child processes appeared while an engine started, so they can be
ended even when the engine's own shutdown fails or start-up hangs. A module-level
registry kills whatever is still alive at interpreter exit (Ctrl-C included).
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

_LIVE: set[ProcessGroup] = set()


class ProcessGroup:
    """The child processes an engine started: those not present when it was :meth:`mark`-ed."""

    def __init__(self, before: set[int]) -> None:
        self.before = before
        self.pids: set[int] = set()
        self.sealed = False
        self.killed_by_watchdog = False
        _LIVE.add(self)

    @classmethod
    def mark(cls) -> ProcessGroup:
        return cls({p.pid for p in _children()})

    def adopt_new(self) -> None:
        """Record every child process born since :meth:`mark`; call once the engine is up.

        After this, processes of engines started later are not taken for this one's.
        """
        self.pids |= {p.pid for p in _children()} - self.before
        self.sealed = True

    def alive(self) -> list[psutil.Process]:
        if not self.sealed:  # still starting: everything new is ours
            self.pids |= {p.pid for p in _children()} - self.before
        found = []
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                continue
        return found

    def kill(self, grace: float = 3.0) -> None:
        """Terminate, then kill, every process of the group and their children."""
        procs = self.alive()
        for proc in list(procs):
            try:
                procs.extend(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, stubborn = psutil.wait_procs(procs, timeout=grace)
        for proc in stubborn:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(stubborn, timeout=grace)
        _LIVE.discard(self)


@contextmanager
def watchdog(seconds: float, on_expiry: Callable[[], None]) -> Iterator[None]:
    """Call ``on_expiry`` from a timer thread if the block runs longer than ``seconds``.

    Killing an engine's processes makes a blocked call in the main thread raise, which
    turns a hang into an error the caller can explain.
    """
    group = getattr(on_expiry, "__self__", None)

    def expire() -> None:
        if isinstance(group, ProcessGroup):
            group.killed_by_watchdog = True
        on_expiry()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _children() -> list[psutil.Process]:
    """Child processes, without multiprocessing's resource tracker (shared, ends with us)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if not _is_resource_tracker(p)]


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


@atexit.register
def _kill_leftovers() -> None:
    for group in list(_LIVE):
        group.kill(grace=1.0)
