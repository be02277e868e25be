"""Engine processes never outlive the test session.

An engine like vLLM spawns an EngineCore and worker processes. :class:`ProcessGroup`
records which child processes appeared while an engine started, so they can be
ended even when the engine's own shutdown fails or start-up hangs. A module-level
registry kills whatever is still alive at interpreter exit (Ctrl-C included).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import psutil

_LIVE: set[ProcessGroup] = set()
_stopping = threading.Event()
"""Set once every engine is being ended on purpose (SIGTERM, exit): no death is news then."""

INTERRUPT = signal.SIGUSR2
"""Sent to the main thread when an engine process dies under a call that waits on it."""

RESEND_S = 2.0
"""Seconds between sends of :data:`INTERRUPT` (plus the poll interval) while the call it should end still waits."""


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
        return [proc for proc in map(_process, self.pids) if proc is not None]

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


ERROR_LINE = re.compile(
    r"^(?:\(\S+ pid=\d+\)\s*)?(?:[A-Z]+ \d\d-\d\d [\d:.]+ \[[^\]]*\]\s*)?"
    r"((?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception)\b(?::.*)?)$"
)
"""The last line of a Python traceback (``RuntimeError: ...``), after vLLM's process and log prefixes
(``(EngineCore pid=N) ERROR 11-23 03:20:38 [core.py:1512]``)."""


class EngineOutput:
    """What an engine's processes print (vLLM logs to stdout, tracebacks go to stderr): passed
    through unchanged, the last lines kept, so that when the engine dies its own last error can
    be named (``RuntimeError: CPU Generator does not use offset``).

    Processes born inside :meth:`attached` get pipes to reader threads as their stdout and stderr.
    """

    def __init__(self, keep: int = 400) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._last_read = time.monotonic()
        self._open = 0

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Give stdout and stderr to pipes while the block starts the engine's processes."""
        saved = {}
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            read, write = os.pipe()
            self._open += 1
            threading.Thread(target=self._pump, args=(read, os.dup(fd)), name=f"rlparity-engine-fd{fd}", daemon=True).start()
            stream.flush()
            saved[fd] = os.dup(fd)
            os.dup2(write, fd)
            os.close(write)
        try:
            yield
        finally:
            for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
                stream.flush()
                os.dup2(saved[fd], fd)
                os.close(saved[fd])

    def follow(self, stream: IO[bytes] | None) -> None:
        """Pass a child's output pipe (``Popen(stdout=PIPE)``) through to this process's stdout, keeping its tail."""
        if stream is None:
            return
        self._open += 1
        read = os.dup(stream.fileno())
        stream.close()
        threading.Thread(target=self._pump, args=(read, os.dup(1)), name="rlparity-engine-output", daemon=True).start()

    def _pump(self, read: int, out: int) -> None:
        partial = b""
        try:
            while data := os.read(read, 65536):
                self._last_read = time.monotonic()
                try:
                    os.write(out, data)
                except OSError:
                    pass
                *complete, partial = (partial + data).split(b"\n")
                self.lines.extend(line.decode(errors="replace").rstrip() for line in complete)
        finally:
            if partial:
                self.lines.append(partial.decode(errors="replace").rstrip())
            os.close(read)
            os.close(out)
            self._open -= 1

    def root_cause(self, settle: float = 0.3, limit: float = 2.0) -> str:
        """The engine's last error line once its output has gone quiet, or ``""``. Errors that point
        "above" (vLLM's wrappers: "see root cause above") give way to the one they point at."""
        deadline = time.monotonic() + limit
        while self._open and time.monotonic() < deadline and time.monotonic() - self._last_read < settle:
            time.sleep(0.05)
        for line in reversed(self.lines):
            match = ERROR_LINE.match(line.strip())
            if match and "EngineDeadError" not in match.group(1) and " above" not in match.group(1):
                return match.group(1)
        return ""


class EngineTimedOut(BaseException):
    """Raised in the main thread when an inline engine (running there, with no process to kill)
    outlived its :func:`watchdog`. A ``BaseException`` for the reason :class:`EngineDied` is."""


class EngineDied(BaseException):
    """Raised in the main thread when an engine process died while a call waited on it.

    A ``BaseException``, so that no ``except Exception`` inside the engine's client swallows it.
    """


@dataclass
class DeathWatch:
    """What :func:`death_watch` saw: the processes that died, by pid and name."""

    died: str = ""
    armed: bool = False


_watching: list[DeathWatch] = []


_timed_out: list[str] = []
"""Inline engine calls the watchdog ended, waiting to be raised in the main thread."""


def _on_interrupt(signum: int, frame: object) -> None:
    if _timed_out:
        raise EngineTimedOut(_timed_out.pop())
    watch = next((w for w in _watching if w.died and w.armed), None)
    if watch is not None:  # stays armed until its block ends: see death_watch's resends
        raise EngineDied(watch.died)


def _can_interrupt_main() -> bool:
    """Whether :data:`INTERRUPT` may be used here: from the main thread, where nobody else handles it."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(INTERRUPT) in (signal.SIG_DFL, _on_interrupt)


@contextmanager
def death_watch(group: ProcessGroup, interval: float = 0.5) -> Iterator[DeathWatch]:
    """Notice within ``interval`` seconds that one of ``group``'s processes died while the block
    runs, and interrupt the main thread with :class:`EngineDied`.

    An engine client blocked on a dead engine core may wait for minutes (seen: over 5 after an
    OOM kill) or forever; a watched call fails in a second, naming the process. Processes the
    watchdog or :meth:`ProcessGroup.kill` ended are not deaths. Interrupts only where the block
    runs in the main thread and nobody else handles :data:`INTERRUPT`.
    """
    watch = DeathWatch()
    names = {}
    for proc in group.alive():
        try:
            names[proc.pid] = proc.name()
        except psutil.Error:
            names[proc.pid] = "?"
    interrupt = _can_interrupt_main()
    if interrupt:
        signal.signal(INTERRUPT, _on_interrupt)
    stop = threading.Event()
    main = threading.main_thread().ident

    def poll() -> None:
        while not stop.wait(interval):
            if group.killed_by_watchdog or group not in _LIVE or _stopping.is_set():
                return
            if not watch.died:
                gone = [pid for pid in names if not _running(pid)]
                if not gone:
                    continue
                watch.died = ", ".join(f"{names[pid]} (pid {pid})" for pid in gone)
                if not interrupt or main is None:
                    return
                watch.armed = True
            # Sent again until the block ends: a handler that runs while the main thread is in a
            # finalizer (a __del__, a weakref callback) has its exception ignored, and the call
            # would then wait on the dead engine forever (seen once in CI).
            signal.pthread_kill(main, INTERRUPT)
            stop.wait(RESEND_S)

    _watching.append(watch)
    thread = threading.Thread(target=poll, name="rlparity-death-watch", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        watch.armed = False
        _watching.remove(watch)


def _process(pid: int) -> psutil.Process | None:
    """The process ``pid`` if it is running (not gone, not a zombie)."""
    try:
        proc = psutil.Process(pid)
        return proc if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def _running(pid: int) -> bool:
    return _process(pid) is not None


@contextmanager
def watchdog(seconds: float, on_expiry: Callable[[], None], *, inline: bool = False) -> Iterator[None]:
    """Call ``on_expiry`` from a timer thread if the block runs longer than ``seconds``.

    Killing an engine's processes makes a blocked call in the main thread raise, which
    turns a hang into an error the caller can explain. An ``inline`` engine runs in the
    main thread itself: there :class:`EngineTimedOut` is raised in the main thread instead
    (between bytecodes: a hang inside one native call ends when that call returns).
    """
    group = getattr(on_expiry, "__self__", None)
    interrupt = inline and _can_interrupt_main()
    if interrupt:
        signal.signal(INTERRUPT, _on_interrupt)
    main = threading.main_thread().ident

    def expire() -> None:
        if isinstance(group, ProcessGroup):
            group.killed_by_watchdog = True
        on_expiry()
        if interrupt and main is not None:
            _timed_out.append(f"no answer within {seconds:.0f}s")
            signal.pthread_kill(main, INTERRUPT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        _timed_out.clear()


SHARED_HELPERS = ("multiprocessing.resource_tracker", "_inductor/compile_worker", "--torch-key=")
"""Helpers a library starts once per process and shares with everything in it, found in their command
lines: multiprocessing's resource tracker and torch inductor's pool of compile workers (its script, or
the prebuilt binary torch may run instead, which takes ``--torch-key=``). Both end with
this process. An engine whose core runs inline starts the compile pool when it first compiles; were it
taken for that engine's and killed with it, the next engine to compile in this process would wait on
the dead pool forever (seen on an H100: an lm_head engine's start hung after the RL engine closed)."""


def _children() -> list[psutil.Process]:
    """Child processes, without the shared helpers (:data:`SHARED_HELPERS`) nor their own children.

    A helper under an engine's process still ends with it: :meth:`ProcessGroup.kill` takes every
    descendant of the processes it ends."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    shared: set[int] = set()
    for helper in filter(_is_shared_helper, children):
        shared.add(helper.pid)
        with contextlib.suppress(psutil.Error):
            shared |= {p.pid for p in helper.children(recursive=True)}
    return [p for p in children if p.pid not in shared]


def _is_shared_helper(proc: psutil.Process) -> bool:
    try:
        return any(helper in " ".join(proc.cmdline()) for helper in SHARED_HELPERS)
    except psutil.Error:
        return False


@atexit.register
def kill_all(grace: float = 1.0) -> None:
    """End every engine process still alive (at exit, and on SIGTERM before anything waits on them)."""
    _stopping.set()
    for group in list(_LIVE):
        group.kill(grace=grace)
