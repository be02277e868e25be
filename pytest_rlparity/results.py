"""What each parity test measured, collected while it runs (the JSON report is :mod:`pytest_rlparity.record`'s).

Checks publish their outcome (verdict, statistics, tolerance, findings, golden
provenance) with :func:`publish`; during a test the plugin collects them with
:func:`collecting` and attaches them to the test's report, so they survive pytest-xdist.
Outside a test nothing collects and :func:`publish` does nothing, so the layer functions
stay usable on their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import Comparison

REPORT_FORMAT = "pytest-rlparity-report/1"
PROPERTY = "rlparity_checks"
"""The key under which a test's checks travel in ``report.user_properties``."""

Sink = Callable[[dict[str, Any], "Comparison | None"], None]
_sink: ContextVar[Sink | None] = ContextVar("rlparity_sink", default=None)


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
