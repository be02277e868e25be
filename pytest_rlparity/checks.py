"""What each check of a parity test found, collected while the test runs.

A check publishes one :class:`CheckEntry` with :func:`publish`; during a test the plugin collects
them with :func:`collecting` and attaches them to the test's report, so they survive pytest-xdist,
and the run's record (:mod:`pytest_rlparity.record`) writes them into the JSON report. Outside a
test nothing collects and :func:`publish` does nothing, so the layer functions stay usable on their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypedDict

REPORT_FORMAT = "pytest-rlparity-report/1"
PROPERTY = "rlparity_checks"
"""The key under which a test's check entries travel in ``report.user_properties``."""


class CheckEntry(TypedDict, total=False):
    """One check's outcome in the JSON report. ``kind`` says which of the optional keys it has."""

    kind: str
    """``comparison`` (engine vs reference logprobs), ``golden``, ``guard``, ``bitwise``, ``objective``, ``plot``, ..."""
    label: str
    layer: str
    verdict: str
    """``pass``/``fail`` for checks; ``match``, ``created``, ``rewritten``, ``re-recorded`` for goldens."""
    stats: dict[str, Any]
    tolerance: dict[str, Any]
    violations: list[str]
    findings: list[dict[str, str]]
    """``{"cause": ..., "message": ...}`` per thing found wrong (:mod:`pytest_rlparity.layers.causes`)."""
    frameworks: dict[str, Any]
    floor: dict[str, float]
    """The precision floor (twin vs fp32 statistics) the bounds were scaled to."""
    floor_ratios: dict[str, float]
    floor_factors: dict[str, float]
    note: str
    allowed: str
    plot: str


Sink = Callable[[CheckEntry, Any], None]
"""Takes an entry and, for a comparison, the :class:`~pytest_rlparity.compare.Comparison` (to plot it)."""
_sink: ContextVar[Sink | None] = ContextVar("rlparity_sink", default=None)


def publish(entry: CheckEntry | dict[str, Any], comparison: Any = None) -> None:
    """Hand one check's outcome to the running test's collector, if any."""
    sink = _sink.get()
    if sink is not None:
        sink(entry, comparison)  # type: ignore[arg-type]


@contextlib.contextmanager
def collecting(sink: Sink) -> Iterator[None]:
    """Route :func:`publish` calls of the code running inside to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
