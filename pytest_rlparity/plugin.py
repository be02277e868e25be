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
from . import cpu_workers, results, worker_exit
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
from .layers import LAYER_DOC, LAYERS, causes
from .record import Outcome, RunRecord
from .scheduling import engine_group_scheduling, keep_xdist_groups
from .session import RLParitySession

CAUSE_KEY = "rlparity_cause"
HEADLINE_KEY = "rlparity_headline"
STARTS_KEY = "rlparity_engine_starts"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--rlparity*`` options and their ini keys."""
    group = parser.getgroup("rlparity", "RL logprob parity (pytest-rlparity)")
    group.addoption("--rlparity", action="store_true", help="run parity tests against a real engine")
    group.addoption("--rlparity-model", metavar="DIR", help="local Hugging Face model directory (default: embedded tiny model)")
    group.addoption(
        "--rlparity-engine",
        metavar="NAME",
        help=f"engine under test, one of the registered engines: {', '.join(registry.names())} (default: vllm)",
    )
    group.addoption(
        "--rlparity-engine-kwarg",
        action="append",
        metavar="KEY=VALUE",
        help="engine kwarg in the engine's own names, value parsed as JSON when it parses; repeatable",
    )
    group.addoption("--rlparity-profile", metavar="FILE", help="TOML/JSON profile: engine, model, engine_kwargs, tolerance")
    group.addoption("--rlparity-golden-dir", metavar="DIR", help="where goldens live (default: golden/)")
    group.addoption(
        "--rlparity-update-goldens",
        nargs="?",
        const="mismatch",
        choices=("mismatch", "all"),
        help="write missing and out-of-tolerance goldens; =all rewrites every golden the run touches",
    )
    group.addoption(
        "--rlparity-baseline",
        metavar="DIR",
        help="migration mode: check against goldens recorded by another engine or engine version (read-only)",
    )
    group.addoption("--rlparity-report", metavar="PATH", help="JSON report of the run (default: <artifacts dir>/report.json; 'none' to skip)")
    group.addoption("--rlparity-start-timeout", type=float, metavar="SECONDS", help="give up on an engine start after this long")
    group.addoption("--rlparity-request-timeout", type=float, metavar="SECONDS", help="give up on one engine call after this long")
    group.addoption("--rlparity-seed", type=int, metavar="N", help="added to the built-in suite's sampling seeds (default 0)")
    group.addoption("--rlparity-trainer-device", metavar="DEVICE", help="where the trainer runs (default: the engine's device)")
    group.addoption(
        "--rlparity-engine-core",
        choices=rlconfig.ENGINE_CORES,
        help="where vLLM's engine core runs: inline (this process), process, or auto (inline on CPU, process on GPU)",
    )
    group.addoption(
        "--rlparity-server-url",
        metavar="URL",
        help="engine vllm-server: test the server running at URL (started with VLLM_SERVER_DEV_MODE=1) instead of starting one",
    )
    parser.addini("rlparity_model", "local Hugging Face model directory", default="")
    parser.addini("rlparity_engine", "engine under test (a registered engine name)", default="vllm")
    parser.addini("rlparity_engine_kwargs", "engine kwargs, one KEY=VALUE per line", type="linelist", default=[])
    parser.addini("rlparity_profile", "profile file (TOML or JSON)", default="")
    parser.addini("rlparity_golden_dir", "golden snapshot directory", default="golden")
    parser.addini("rlparity_artifacts_dir", "where plots of a run are written", default="rlparity-artifacts")
    parser.addini("rlparity_report", "JSON report path ('none' to skip)", default="")
    parser.addini("rlparity_start_timeout", "seconds before an engine start is abandoned", default="600")
    parser.addini("rlparity_request_timeout", "seconds before one engine call is abandoned", default="300")
    parser.addini("rlparity_max_engines", "engines kept running at once", default="2")
    parser.addini("rlparity_trainer_device", "where the trainer runs (default: the engine's device)", default="")
    parser.addini("rlparity_engine_core", "where vLLM's engine core runs: auto, inline or process", default="auto")
    parser.addini("rlparity_server_url", "a running vLLM server to test (engine vllm-server)", default="")
    parser.addini(
        "rlparity_worker_exit",
        "how a pytest-xdist worker ends after its session: fast (without the interpreter's 2-3 s teardown) or full",
        default="fast",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the layer markers and, with ``--rlparity``, open the parity session."""
    config.addinivalue_line("markers", "rlparity: a parity test (needs --rlparity)")
    config.addinivalue_line("markers", "xdist_group(name): tests sharing one engine configuration (pytest -n N --dist loadgroup)")
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: parity layer '{layer}': {LAYER_DOC[layer]} (needs --rlparity)")
    options = rlconfig.resolve(config)
    if options.enabled:
        session = RLParitySession(options, worker=hasattr(config, "workerinput"))
        config.stash[SESSION_KEY] = session
        config.pluginmanager.register(OutcomeRecorder(session.record), "rlparity-outcomes")
        cpu_workers.wait_passively(config, session.trainer_device)
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
    with parity.record.collecting(item.nodeid) as checks:
        try:
            return (yield)
        finally:
            if checks:
                item.user_properties.append((results.PROPERTY, checks))


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
            recorded = next((o for o in reversed(self.record.outcomes) if o.nodeid == report.nodeid), None)
            if recorded is not None:
                recorded.duration = self.spent[report.nodeid]
                recorded.ended = _rounded(getattr(report, "stop", None))
        if not (report.when == "call" or (report.when == "setup" and not report.passed)):
            return
        layer = next((m for m in LAYERS if m in report.keywords), None)
        if layer is None and "rlparity" not in report.keywords:
            return
        props = dict(report.user_properties)
        self.record.outcomes.append(
            Outcome(
                report.nodeid,
                layer or "custom",
                report.outcome,
                props.get(CAUSE_KEY),
                props.get(HEADLINE_KEY, ""),
                self.spent[report.nodeid],
                props.get(results.PROPERTY, []),
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
    return next((rank for rank, layer in enumerate(LAYERS) if item.get_closest_marker(layer)), len(LAYERS))


def _is_parity(item: pytest.Item) -> bool:
    if any(item.get_closest_marker(m) for m in (*LAYERS, "rlparity")):
        return True
    return any(name.startswith("rlparity_") for name in getattr(item, "fixturenames", ()))
