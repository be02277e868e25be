"""pytest hooks: options, markers, gating, report header and the layered summary.

Only hooks live here; the work is in the modules they call. Without ``--rlparity``
nothing heavy is imported and every parity test is skipped with a reason.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Generator

import pytest

from . import config as rlconfig
from . import checks, cpu_workers, worker_exit
from .engines import registry
from .errors import EngineError, GoldenError, ParityError
from .fixtures import (  # noqa: F401  (fixtures are registered by being imported here)
    DISABLED_REASON,
    SESSION_KEY,
    get_session,
    rlparity_engine,
    rlparity_engine_factory,
    rlparity_golden,
    rlparity_prompts,
    rlparity_session,
    rlparity_tolerance,
    rlparity_trainer,
    rlparity_trainer_factory,
)
from .layers import CUSTOM, LAYER_DOC, LAYERS, causes, layer_of
from .record import Outcome, RunRecord
from .scheduling import auto_workers, engine_group_scheduling, group_session_engine_tests, keep_xdist_groups, without_group
from .session import RLParitySession

CAUSE_KEY = "rlparity_cause"
HEADLINE_KEY = "rlparity_headline"
STARTS_KEY = "rlparity_engine_starts"
LOADGROUP_KEY = "rlparity_loadgroup"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--rlparity*`` options and their ini keys, from their one definition (:data:`.config.SPECS`)."""
    rlconfig.add_options(parser)


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config) -> Generator[None, object, object]:
    """``pytest --rlparity -n N`` distributes by engine group (``--dist loadgroup``) unless told otherwise:
    pytest-xdist's own default, ``load``, would start every engine in every worker. A wrapper, so that it
    runs before pytest-xdist's own ``tryfirst`` implementation turns ``-n`` into ``--dist load``."""
    option = config.option
    if getattr(option, "rlparity", False) and getattr(option, "numprocesses", None) and getattr(option, "dist", None) == "no":
        option.dist = "loadgroup"
    return (yield)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """Tell each pytest-xdist worker that the run distributes by group: a worker parses the command line
    again, where ``--dist loadgroup`` set by :func:`pytest_cmdline_main` is missing, and names its tests'
    groups in their node ids only under it."""
    config = node.config  # type: ignore[attr-defined]
    node.workerinput[LOADGROUP_KEY] = config.getvalue("dist") == "loadgroup"  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``pytest --rlparity -n auto``: the measured worker count for the engine's device
    (:data:`pytest_rlparity.scheduling.AUTO_WORKERS`); without ``--rlparity``, pytest-xdist's own."""
    if not config.getoption("rlparity"):
        return None
    try:
        engine = registry.engine_class(config.getoption("rlparity_engine") or rlconfig.SPEC["engine"].default)
    except EngineError:
        return None  # configure names the unknown engine as a usage error
    return auto_workers(engine.installed().device)


def pytest_configure(config: pytest.Config) -> None:
    """Register the layer markers and, with ``--rlparity``, open the parity session."""
    config.addinivalue_line("markers", "rlparity: a parity test (needs --rlparity)")
    config.addinivalue_line("markers", "xdist_group(name): tests sharing one engine configuration (pytest -n N --dist loadgroup)")
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: parity layer '{layer}': {LAYER_DOC[layer]} (needs --rlparity)")
    if getattr(config, "workerinput", {}).get(LOADGROUP_KEY):
        config.option.loadgroup = True
    options = rlconfig.resolve(config)
    if options.enabled:
        session = RLParitySession(options, worker=hasattr(config, "workerinput"))
        config.stash[SESSION_KEY] = session
        config.pluginmanager.register(OutcomeRecorder(session.record), "rlparity-outcomes")
        cpu_workers.share_cores(config, session.trainer_device)
        _interrupt_on_sigterm()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """With ``--dist loadgroup``: engine groups longest first, a worker's next group only when it is
    about to finish its last (see :mod:`pytest_rlparity.scheduling`)."""
    if get_session(config) is None or config.getvalue("dist") != "loadgroup":
        return None
    from .suite import LONGEST_FIRST  # the suite's groups: imported only when scheduling them

    return engine_group_scheduling(config, log, LONGEST_FIRST)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the engine, its version, the model fingerprint, device and dtype."""
    session = get_session(config)
    if session is None:
        return ["rlparity: off (parity tests are skipped; run with --rlparity)"]
    return session.header()


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test on the session's engine that names no xdist group joins the session engine's group, so that
    engine starts once per run under ``-n``, not once per worker (before pytest-xdist reads the groups)."""
    if get_session(item.config) is not None:
        group_session_engine_tests(item)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run layers lowest first; without ``--rlparity``, skip every parity test. Under pytest-xdist's
    ``--dist loadgroup``, keep tests that share an engine in one group (also on pytest >= 9.2)."""
    keep_xdist_groups(config, items)
    if get_session(config) is not None:
        items.sort(key=_layer_rank)  # stable: order within a layer is kept
        return
    skip = pytest.mark.skip(reason=DISABLED_REASON)
    for item in items:
        if _is_parity(item):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Collect what the test's checks publish into its report's ``user_properties`` (they travel with xdist)."""
    parity = get_session(item.config)
    if parity is None:
        return (yield)
    with parity.record.collecting(item.nodeid) as entries:
        try:
            return (yield)
        finally:
            if entries:
                item.user_properties.append((checks.PROPERTY, entries))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the likely cause of a parity failure, and the engines started for the test, to the report
    (user properties survive pytest-xdist)."""
    report = yield
    parity = get_session(item.config)
    if parity is not None:
        workerinput = getattr(item.config, "workerinput", {})
        starts = parity.new_engine_starts(workerinput.get("workerid"))
        if starts:
            report.user_properties.append((STARTS_KEY, starts))
    if call.excinfo is not None and report.failed:
        exc = call.excinfo.value
        if isinstance(exc, ParityError):
            cause = exc.cause or exc.layer
        elif isinstance(exc, GoldenError):
            cause = causes.GOLDEN
        elif isinstance(exc, EngineError):
            cause = causes.ENGINE
        else:
            cause = None
        if cause:
            report.user_properties.append((CAUSE_KEY, str(cause)))  # a plain str travels with pytest-xdist
            headline = getattr(exc, "headline", None) or str(exc).strip().splitlines()[0]
            report.user_properties.append((HEADLINE_KEY, headline[:240]))
    return report


class OutcomeRecorder:
    """Records each parity test's outcome under its layer (also on the xdist controller)."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.spent: dict[str, float] = {}
        """Seconds per test over its phases so far: set-up (where engines start) counts."""
        self.began: dict[str, float | None] = {}
        """When each test's set-up began (seconds since the epoch), where pytest's reports carry ``start``."""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == STARTS_KEY:
                self.record.engine_starts += value
        self.spent[report.nodeid] = self.spent.get(report.nodeid, 0.0) + report.duration
        self.began.setdefault(report.nodeid, _rounded(getattr(report, "start", None)))
        if report.when == "teardown":
            recorded = next((o for o in reversed(self.record.outcomes) if o.nodeid == without_group(report.nodeid)), None)
            if recorded is not None:
                recorded.duration = self.spent[report.nodeid]
                recorded.ended = _rounded(getattr(report, "stop", None))
        if not (report.when == "call" or (report.when == "setup" and not report.passed)):
            return
        layer = layer_of(report)
        if layer is None and "rlparity" not in report.keywords:
            return
        props = dict(report.user_properties)
        self.record.outcomes.append(
            Outcome(
                without_group(report.nodeid),
                layer or CUSTOM,
                report.outcome,
                props.get(CAUSE_KEY),
                props.get(HEADLINE_KEY, ""),
                self.spent[report.nodeid],
                props.get(checks.PROPERTY, []),
                getattr(report, "worker_id", None),
                self.began[report.nodeid],
            )
        )


def _rounded(moment: float | None) -> float | None:
    return round(moment, 2) if moment else None


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Close every engine, also after failures and Ctrl-C; write the JSON report (once, not per xdist worker)."""
    parity = get_session(session.config)
    if parity is not None:
        parity.close()
        if not hasattr(session.config, "workerinput"):
            parity.record.write_report(parity.run_info())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Results by layer, lowest first, so the root cause is read before its consequences."""
    parity = get_session(config)
    if parity is None:
        return
    lines = parity.record.summary()
    if lines:
        terminalreporter.section("rlparity: results by layer (lowest first)")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Close every engine (again: idempotent); a pytest-xdist worker, its session over, then ends without the
    interpreter's teardown, which the controller would wait for (:mod:`pytest_rlparity.worker_exit`)."""
    parity = get_session(config)
    if parity is not None:
        parity.close()
        if parity.worker and parity.options.worker_exit == "fast":
            worker_exit.arm()


TERM_GRACE_S = 30.0
"""After SIGTERM, how long pytest may take to tear down before the process ends regardless."""


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (a CI cancel or timeout, ``kill``) like Ctrl-C, so pytest's teardown runs,
    but first end the engine processes and arm a deadline.

    CI runners signal the whole process group: the engine core dies with pytest, and a
    KeyboardInterrupt raised while vLLM's client holds a lock could leave teardown waiting on
    it forever (seen: every thread on a futex for 20 minutes). With the engines already gone
    nothing is left to wait for, and :data:`TERM_GRACE_S` after the signal the process exits
    with 143 whatever still waits. Only installed where nobody else handles SIGTERM, and
    only from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def interrupt(signum: int, frame: object) -> None:
            from .engines.processes import kill_all

            deadline = threading.Timer(TERM_GRACE_S, _exit_after_term, args=(signum,))
            deadline.daemon = True
            deadline.start()
            kill_all()
            raise KeyboardInterrupt(f"received signal {signum}")

        signal.signal(signal.SIGTERM, interrupt)


def _exit_after_term(signum: int) -> None:
    sys.stderr.write(
        f"\nrlparity: pytest did not finish within {TERM_GRACE_S:.0f}s of signal {signum}; the engines were "
        "already stopped, exiting now\n"
    )
    sys.stderr.flush()
    os._exit(128 + signum)


def _layer_rank(item: pytest.Item) -> int:
    layer = layer_of(item)
    return LAYERS.index(layer) if layer else len(LAYERS)


def _is_parity(item: pytest.Item) -> bool:
    if layer_of(item) or item.get_closest_marker("rlparity"):
        return True
    return any(name.startswith("rlparity_") for name in getattr(item, "fixturenames", ()))
