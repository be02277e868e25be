"""How long the suite takes, and how much of it is engine starts.

    python -m pytest_rlparity bench [PYTEST ARGS...]     e.g. bench -m semantic --rlparity-profile=profiles/gpu-bf16.toml

Runs ``pytest --rlparity`` with the arguments given, then reads the run's JSON report and prints
the wall time, each engine start, the longest one, the time in checks (the tests' set-up, call
and teardown, less the engine starts) and ``wall / (longest start + checks / workers)``: 1.0 when
every start but the longest overlaps the checks, higher when starts queue one after another. Under
``pytest -n N`` the checks are shared by the workers, and each worker's starts, checks, busy time
and first and last moment in tests are printed: the busiest worker is the run's critical path. The
time outside tests (pytest's start-up before the first, the engines' close and the exit after the
last) is printed too: no engine work can overlap it. A configuration started more than once is
flagged ``DUPLICATE``: under ``-n`` each should start in one worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def summarize(report: dict[str, Any], wall: float, started: float | None = None) -> list[str]:
    """The benchmark's lines, from a run's JSON report, its wall time and when it started (seconds since
    the epoch: then each worker's first and last moment in tests is shown, the run's start-up and tail)."""
    starts = report["run"].get("engine_starts", [])
    seconds = [float(s["seconds"]) for s in starts]
    in_tests = sum(float(t["duration_s"]) for t in report["tests"])
    checks = max(in_tests - sum(seconds), 0.0)
    longest = max(seconds, default=0.0)
    outcomes = {k: sum(t["outcome"] == k for t in report["tests"]) for k in ("passed", "failed", "skipped")}
    lines = [f"tests: {outcomes['passed']} passed, {outcomes['failed']} failed, {outcomes['skipped']} skipped"]
    for s in starts:
        shown = {k: v for k, v in s["kwargs"].items() if k in ("engine_core", "enable_prefix_caching", "enable_chunked_prefill",
                                                                   "max_num_batched_tokens", "dtype", "hf_overrides", "model")}
        lines.append(f"  engine start {float(s['seconds']):6.1f} s  {json.dumps(shown, sort_keys=True)}" + (f"  [{s['worker']}]" if s.get("worker") else ""))
    lines += duplicate_starts(starts)
    workers = sorted({t.get("worker") for t in report["tests"]} - {None})
    for worker in workers:
        tests = [t for t in report["tests"] if t.get("worker") == worker]
        busy = sum(float(t["duration_s"]) for t in tests)
        mine = [float(s["seconds"]) for s in starts if s.get("worker") == worker]
        line = f"  worker {worker}: {len(mine)} starts ({sum(mine):.1f} s), checks {max(busy - sum(mine), 0.0):.1f} s, busy {busy:.1f} s"
        span = _in_tests(tests, started)
        if span:
            line += f", in tests from {span[0]:.1f} s to {span[1]:.1f} s"
        lines.append(line)
    ideal = longest + checks / max(len(workers), 1)
    lines.append(f"wall                 {wall:7.1f} s")
    span = _in_tests(report["tests"], started)
    if span:
        before, after = span[0], wall - span[1]
        lines.append(
            f"outside tests        {before + after:7.1f} s   ({before:.1f} s before the first: start-up and collection;"
            f" {after:.1f} s after the last: closing engines, exit)"
        )
    lines += [
        f"engine starts        {len(seconds):7d}   ({sum(seconds):.1f} s in all, longest {longest:.1f} s)",
        f"checks               {checks:7.1f} s" + (f"   (on {len(workers)} workers)" if workers else ""),
        f"wall / (longest start + checks{' / workers' if workers else ''}) = {wall / max(ideal, 1e-9):.2f}",
    ]
    return lines


def duplicate_starts(starts: list[dict[str, Any]]) -> list[str]:
    """One line for each engine configuration started more than once: under ``-n`` a configuration
    should start in one worker; a second start (another worker, or a close to make room) is time lost."""
    by_configuration: dict[str, list[dict[str, Any]]] = {}
    for start in starts:
        by_configuration.setdefault(json.dumps(start["kwargs"], sort_keys=True), []).append(start)
    lines = []
    for kwargs, same in by_configuration.items():
        if len(same) > 1:
            where = ", ".join(f"{s.get('worker') or 'main'} {float(s['seconds']):.1f} s" for s in same)
            lines.append(f"  DUPLICATE: one configuration started {len(same)} times ({where}): {kwargs}")
    return lines


def _in_tests(tests: list[dict[str, Any]], started: float | None) -> tuple[float, float] | None:
    """When the first of ``tests`` began and the last ended, in seconds after ``started``; ``None``
    where the report or the caller does not say."""
    began = [t["began"] for t in tests if t.get("began")]
    ended = [t["ended"] for t in tests if t.get("ended")]
    if started is None or not began or not ended:
        return None
    return min(began) - started, max(ended) - started


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    kept = [a.split("=", 1)[1] for a in argv if a.startswith("--rlparity-report=")]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(kept[-1]) if kept else Path(tmp) / "report.json"  # the user's report, if they asked for one
        started, began = time.time(), time.monotonic()
        rc = subprocess.run([sys.executable, "-m", "pytest", "--rlparity", f"--rlparity-report={report}", "-q", *argv]).returncode
        wall = time.monotonic() - began
        if not report.exists():
            print(f"bench: pytest exited {rc} without a report; nothing to measure", file=sys.stderr)
            return rc or 1
        print("\n".join(["", "rlparity bench", *summarize(json.loads(report.read_text()), wall, started)]))
    return rc
