"""What each parity test measured, collected while it runs, and the run's JSON report.

Checks publish their outcome (verdict, statistics, tolerance, findings, golden
provenance) with :func:`publish`; during a test the plugin collects them with
:func:`collecting` and attaches them to the test's report, so they survive pytest-xdist.
Outside a test nothing collects and :func:`publish` does nothing, so the layer functions
stay usable on their own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from . import causes, frameworks
from .files import jsonable

if TYPE_CHECKING:
    from .compare import Comparison

REPORT_FORMAT = "pytest-rlparity-report/1"
PROPERTY = "rlparity_checks"
"""The key under which a test's checks travel in ``report.user_properties``."""

Sink = Callable[[dict[str, Any], "Comparison | None"], None]
_sink: ContextVar[Sink | None] = ContextVar("rlparity_sink", default=None)


def advice_for(cause: str | None) -> str | None:
    """What to try first for the cause called ``cause`` (:mod:`pytest_rlparity.causes`)."""
    found = causes.CAUSES.get(cause or "")
    return found.advice if found is not None else None


def publish(entry: dict[str, Any], comparison: Comparison | None = None) -> None:
    """Hand one check's outcome to the running test's collector, if any."""
    sink = _sink.get()
    if sink is not None:
        sink(entry, comparison)


@contextlib.contextmanager
def collecting(sink: Sink) -> Iterator[None]:
    """Route :func:`publish` calls of the code running inside to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def build_report(run: dict[str, Any], outcomes: list[Any], layers: tuple[str, ...]) -> dict[str, Any]:
    """The machine-readable report: the run, a verdict per layer, and every test with its checks."""
    layer_rows = {}
    failed_below: list[str] = []
    tests = []
    for layer in (*layers, "custom"):
        mine = [o for o in outcomes if o.layer == layer]
        if not mine:
            continue
        counts = {k: sum(o.outcome == k for o in mine) for k in ("passed", "failed", "skipped")}
        layer_rows[layer] = {"verdict": "failed" if counts["failed"] else "ok", **counts}
        for o in mine:
            tests.append(
                {
                    "nodeid": o.nodeid,
                    "layer": o.layer,
                    "outcome": o.outcome,
                    "duration_s": round(o.duration, 3),
                    "cause": o.cause,
                    "advice": advice_for(o.cause) if o.outcome == "failed" else None,
                    "downstream_of": list(failed_below) if o.outcome == "failed" else [],
                    "headline": o.headline,
                    "checks": o.checks,
                }
            )
        if counts["failed"]:
            failed_below.append(layer)
    return {
        "format": REPORT_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "run": jsonable(run),
        "layers": layer_rows,
        "frameworks": jsonable(frameworks.worst(framework_checks(outcomes))),
        "tests": tests,
    }


def framework_checks(outcomes: list[Any]) -> list[dict[str, float]]:
    """The framework metrics of every engine-vs-trainer comparison of the semantic layer."""
    return [c["frameworks"] for o in outcomes for c in o.checks if c.get("layer") == "semantic" and c.get("frameworks")]


def dump_report(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=False) + "\n"
