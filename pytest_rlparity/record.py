"""What a parity run found, and how it is told: outcomes by layer, engine starts, the summary and the JSON report.

Filled by the plugin's hooks (also on the pytest-xdist controller, from every worker's reports);
the resources that produced the results live in :mod:`pytest_rlparity.session`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checks, frameworks
from .checks import CheckEntry
from .config import Options
from .files import jsonable, safe_name, write_atomic
from .layers import CUSTOM, LAYER_DOC, LAYERS, causes

if TYPE_CHECKING:
    from .compare import Comparison


@dataclass
class Outcome:
    """The result of one parity test, for the layered summary."""

    nodeid: str
    layer: str
    outcome: str
    cause: str | None = None
    headline: str = ""
    duration: float = 0.0
    """Seconds over set-up, call and teardown (engines start in set-up)."""
    checks: list[CheckEntry] = dataclasses.field(default_factory=list)
    """What the test's checks published (see :mod:`pytest_rlparity.checks`)."""
    worker: str | None = None
    """The pytest-xdist worker that ran it (``None`` in a run without ``-n``)."""
    began: float | None = None
    """When its set-up began, and when its teardown ended (seconds since the epoch): the run's timeline."""
    ended: float | None = None


class RunRecord:
    """Every parity test's outcome, the run's engine starts, and their rendering."""

    def __init__(self, options: Options, *, worker: bool = False) -> None:
        self.options = options
        self.worker = worker
        self.outcomes: list[Outcome] = []
        self.engine_starts: list[dict[str, Any]] = []
        """Every engine start of the run, as test reports carry them (from every xdist worker)."""
        self.report_written: Path | None = None

    @contextlib.contextmanager
    def collecting(self, nodeid: str) -> Iterator[list[CheckEntry]]:
        """Collect what the checks of one test publish; a failing comparison also gets its plot."""
        entries: list[CheckEntry] = []

        def sink(entry: CheckEntry, comparison: Comparison | None) -> None:
            if comparison is not None and entry.get("verdict") == "fail":
                from .plots import plot_comparison

                name = f"{safe_name(nodeid, limit=120)}-{len(entries)}.png"
                title = f"{nodeid.rsplit('::', 1)[-1]}: {entry.get('label', '')}"
                entry["plot"] = plot_comparison(comparison, title, str(self.artifact_path(name)))
            entries.append(entry)

        with checks.collecting(sink):
            yield entries

    def write_report(self, run_info: dict[str, Any]) -> Path | None:
        """The JSON report of the run (``rlparity_report``), written atomically."""
        if self.options.report is None or not self.outcomes:
            return None
        report = build_report(run_info, self.outcomes, LAYERS)
        write_atomic(self.options.report, dump_report(report))
        self.report_written = self.options.report
        return self.report_written

    def summary(self) -> list[str]:
        """Results grouped by layer, lowest first, with each failure's likely cause."""
        lines = []
        report = build_report({}, self.outcomes, LAYERS)
        for layer, row in report["layers"].items():
            lines.append(
                f"{layer:<15} {VERDICT_SHOWN[row['verdict']]:<11} {row['passed']} passed, {row['failed']} failed, "
                f"{row['skipped']} skipped" + (f"  - {LAYER_DOC[layer]}" if layer in LAYER_DOC else "")
            )
            for test in report["tests"]:
                if test["layer"] != layer or test["outcome"] != "failed":
                    continue
                below = test["downstream_of"]
                downstream = f" (probably downstream of the failing {', '.join(below)} layer)" if below else ""
                cause = f" [{test['cause']}]" if test["cause"] else ""
                lines.append(f"    FAILED {test['nodeid']}{cause}{downstream}")
                if test["headline"]:
                    lines.append(f"        {test['headline']}")
                if test["advice"] and not below:
                    lines.append(f"        try: {test['advice']}")
                lines += [f"        plot: {c['plot']}" for c in test["checks"] if c.get("plot")]
        if report["frameworks"]:
            lines.append("RL frameworks' own mismatch metrics, engine vs trainer (semantic layer), against their alarm thresholds:")
            lines += frameworks.table(report["frameworks"])
        if self.engine_starts:
            secs = ", ".join(f"{s['seconds']:.1f}s" for s in self.engine_starts)
            workers = {s.get("worker") for s in self.engine_starts} - {None}
            lines.append(f"engine starts: {len(self.engine_starts)} ({secs})" + (f" on {len(workers)} workers" if len(workers) > 1 else ""))
        lines += self.floor_summary()
        goldens = [c for o in self.outcomes for c in o.checks if c.get("kind") == "golden"]
        lines += [c["note"] for c in goldens if c.get("note")]
        allowed = [c["allowed"] for c in goldens if c.get("allowed")]
        if allowed:
            lines.append(f"goldens: {len(allowed)} matched with allowed differences (details in the report), e.g. {allowed[0]}")
        plots = [c["plot"] for o in self.outcomes for c in o.checks if c.get("plot")]
        if plots:
            lines.append(f"plots: {len(plots)} PNG(s) in {self.options.artifacts_dir}")
        if self.report_written is not None:
            lines.append(f"report: {self.report_written}")
        return lines

    def floor_summary(self) -> list[str]:
        """One line on the checks scaled to the precision floor: how many, and the worst ratio of each statistic."""
        scaled = [(o.nodeid.rsplit("::", 1)[-1], c) for o in self.outcomes for c in o.checks if c.get("floor_ratios")]
        if not scaled:
            return []
        worst = []
        for stat in ("mean_abs", "k3_kl", "mean_offset"):
            bounded = [(name, check) for name, check in scaled if stat in check["floor_factors"]]
            if bounded:
                name, check = max(bounded, key=lambda nc: nc[1]["floor_ratios"].get(stat, 0.0))
                worst.append(f"{stat} {check['floor_ratios'].get(stat, 0.0):.2f}x (bound {check['floor_factors'][stat]:g}x, {name})")
        return [f"precision floor: {len(scaled)} comparisons scaled to the model's own reduced-precision noise; worst " + "; ".join(worst)]

    def failures_below(self, layer: str) -> list[str]:
        """Failed tests of the layers under ``layer`` so far: what an objective failure is probably downstream of.

        A pytest-xdist worker knows only its own tests, so it names none (the controller's summary
        marks downstream failures from every worker's results)."""
        if self.worker:
            return []
        below = LAYERS[: LAYERS.index(layer)] if layer in LAYERS else LAYERS
        return [o.nodeid.rsplit("::", 1)[-1] for o in self.outcomes if o.layer in below and o.outcome == "failed"]

    def artifact_path(self, name: str) -> Path:
        """Where a run's plots go: ``<rootdir>/rlparity-artifacts/<name>``."""
        self.options.artifacts_dir.mkdir(parents=True, exist_ok=True)
        return self.options.artifacts_dir / name


def advice_for(cause: str | None) -> str | None:
    """What to try first for the cause called ``cause`` (:mod:`pytest_rlparity.layers.causes`)."""
    found = causes.CAUSES.get(cause or "")
    return found.advice if found is not None else None


VERDICT_SHOWN = {"failed": "FAILED", "not checked": "not checked", "ok": "ok"}


def layer_verdict(counts: dict[str, int]) -> str:
    """``failed`` if a test failed, ``not checked`` if none passed (all skipped: nothing was shown), else ``ok``."""
    if counts["failed"]:
        return "failed"
    return "ok" if counts["passed"] else "not checked"


def build_report(run: dict[str, Any], outcomes: list[Any], layers: tuple[str, ...]) -> dict[str, Any]:
    """The machine-readable report: the run, a verdict per layer, and every test with its checks."""
    layer_rows = {}
    failed_below: list[str] = []
    tests = []
    for layer in (*layers, CUSTOM):
        mine = [o for o in outcomes if o.layer == layer]
        if not mine:
            continue
        counts = {k: sum(o.outcome == k for o in mine) for k in ("passed", "failed", "skipped")}
        layer_rows[layer] = {"verdict": layer_verdict(counts), **counts}
        for o in mine:
            tests.append(
                {
                    "nodeid": o.nodeid,
                    "layer": o.layer,
                    "outcome": o.outcome,
                    "duration_s": round(o.duration, 3),
                    "worker": o.worker,
                    "began": o.began,
                    "ended": o.ended,
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
        "format": checks.REPORT_FORMAT,
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
