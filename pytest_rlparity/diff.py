"""``python -m pytest_rlparity diff A B``: two golden sets or two JSON reports, verdict per layer.

For people who keep goldens from several engines: which layer moved between A and B,
and by how much. Golden sets are compared with the same code and tolerances as a
migration run (``--rlparity-baseline``): tokens may diverge where the samplers draw
differently, logprobs are compared where the tokens agree, curves against their bands.
Exit status: 0 when every layer is the same within tolerance, 1 when one differs, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GoldenError
from .golden import (
    FORMAT,
    MIGRATION_IDENTITY_KEYS,
    MIGRATION_NOTED_KEYS,
    GoldenDiff,
    Snapshot,
    compare_golden,
    identity_differences,
    load,
    noted_differences,
)
from .layers import LAYERS
from .numerics import numerics_for
from .checks import REPORT_FORMAT


@dataclass
class LayerDiff:
    """The files of one layer compared, and what differed."""

    files: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    distance: dict[str, float] = field(default_factory=dict)
    """The worst of each distance over the layer's files."""

    def add(self, name: str, diff: GoldenDiff) -> None:
        self.files += 1
        self.problems += [f"{name}: {p}" for p in diff.problems]
        self.notes += [f"{name}: {n}" for n in diff.notes]
        for key, value in diff.distance.items():
            combine = (lambda a, b: a + b) if key in ("tokens_compared", "sequences_diverged") else max
            self.distance[key] = combine(self.distance.get(key, 0), value)


def golden_files(root: Path) -> dict[str, Path]:
    """Every golden under ``root`` by its path relative to ``root``."""
    found = {}
    for path in sorted(root.rglob("*.json")):
        try:
            head = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            head = None
        if isinstance(head, dict) and head.get("format") == FORMAT:
            found[path.relative_to(root).as_posix()] = path
    return found


def pair_goldens(a: dict[str, Path], b: dict[str, Path]) -> tuple[dict[str, tuple[Path, Path]], list[str], list[str]]:
    """Match goldens by relative path, below the platform directory where one side is a single platform."""

    def views(files: dict[str, Path]) -> list[dict[str, Path]]:
        tops = {k.split("/", 1)[0] for k in files}
        return [files, {k.split("/", 1)[1]: v for k, v in files.items()}] if len(tops) == 1 and all("/" in k for k in files) else [files]

    a, b = max(((x, y) for x in views(a) for y in views(b)), key=lambda xy: len(set(xy[0]) & set(xy[1])))
    pairs = {k: (a[k], b[k]) for k in sorted(set(a) & set(b))}
    return pairs, sorted(set(a) - set(b)), sorted(set(b) - set(a))


def diff_goldens(root_a: Path, root_b: Path) -> tuple[dict[str, LayerDiff], list[str]]:
    """Per layer, how golden set B differs from golden set A; plus lines about what could not be paired."""
    pairs, only_a, only_b = pair_goldens(golden_files(root_a), golden_files(root_b))
    if not pairs:
        raise GoldenError(f"no golden of {root_a} has a counterpart in {root_b}: are both golden directories of the same suite?")
    layers: dict[str, LayerDiff] = {}
    context: list[str] = []
    for name, (path_a, path_b) in pairs.items():
        doc_a, doc_b = load(path_a), load(path_b)
        prov_a, prov_b = doc_a.get("provenance", {}), doc_b.get("provenance", {})
        layer = layers.setdefault(path_a.parent.name, LayerDiff())
        problems = identity_differences(prov_a, prov_b, MIGRATION_IDENTITY_KEYS)
        if problems:
            layer.add(name, GoldenDiff(problems=["not comparable: " + "; ".join(problems)]))
            continue
        record = Snapshot(doc_b["sequences"], doc_b["stats"], doc_b.get("sampling"), doc_b["curves"], doc_b["summaries"])
        layer.add(name, compare_golden(doc_a, record, numerics_for(str(prov_a.get("dtype"))).golden, migration=True))
        if not context:
            context = noted_differences(prov_a, prov_b, MIGRATION_NOTED_KEYS)
    context += [f"only in A: {n}" for n in only_a] + [f"only in B: {n}" for n in only_b]
    return layers, context


def diff_reports(path_a: Path, path_b: Path) -> tuple[dict[str, LayerDiff], list[str]]:
    """Per layer, which tests changed outcome and how their checks' statistics moved."""
    report_a, report_b = _load_report(path_a), _load_report(path_b)
    tests_a = {t["nodeid"]: t for t in report_a["tests"]}
    tests_b = {t["nodeid"]: t for t in report_b["tests"]}
    layers: dict[str, LayerDiff] = {}
    for nodeid in sorted(set(tests_a) & set(tests_b)):
        a, b = tests_a[nodeid], tests_b[nodeid]
        diff = GoldenDiff()
        if a["outcome"] != b["outcome"]:
            diff.problems.append(f"{a['outcome']} in A, {b['outcome']} in B" + (f" ({b['headline']})" if b.get("headline") else ""))
        checks_a = {c.get("label"): c for c in a.get("checks", [])}
        for check in b.get("checks", []):
            before = checks_a.get(check.get("label"))
            if before is None:
                continue
            if (before.get("verdict") == "fail") != (check.get("verdict") == "fail"):  # created/match/pass are all fine
                diff.problems.append(f"{check['label']}: {before.get('verdict')} in A, {check.get('verdict')} in B")
            for stat in ("mean_abs", "max_abs", "k3_kl"):
                x, y = before.get("stats", {}).get(stat), check.get("stats", {}).get(stat)
                if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
                    diff.distance[f"stat_{stat}"] = max(diff.distance.get(f"stat_{stat}", 0.0), abs(x - y))
        layers.setdefault(b["layer"], LayerDiff()).add(nodeid.rsplit("::", 1)[-1], diff)
    run_a, run_b = report_a.get("run", {}), report_b.get("run", {})
    context = [f"{k}: {run_a.get(k)} -> {run_b.get(k)}" for k in ("engine", "engine_version", "dtype", "model_fingerprint") if run_a.get(k) != run_b.get(k)]
    context += [f"only in A: {n}" for n in sorted(set(tests_a) - set(tests_b))]
    context += [f"only in B: {n}" for n in sorted(set(tests_b) - set(tests_a))]
    return layers, context


def render(layers: dict[str, LayerDiff], context: list[str], name_a: str, name_b: str, limit: int = 8) -> str:
    """The per-layer verdict table, lowest layer first, then what differs."""
    order = [*(l for l in LAYERS if l in layers), *sorted(set(layers) - set(LAYERS))]
    lines = [f"A: {name_a}", f"B: {name_b}"]
    lines += [f"  {c}" for c in context]
    lines.append(f"{'layer':<16}{'verdict':<10}{'files':>6}  distance (worst over the layer)")
    for name in order:
        layer = layers[name]
        verdict = "DIFFERS" if layer.problems else "same"
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(layer.distance.items()))
        lines.append(f"{name:<16}{verdict:<10}{layer.files:>6}  {shown}")
    for name in order:
        layer = layers[name]
        for problem in layer.problems[:limit]:
            lines.append(f"  [{name}] {problem}")
        if len(layer.problems) > limit:
            lines.append(f"  [{name}] ... and {len(layer.problems) - limit} more")
        for note in layer.notes[:2]:
            lines.append(f"  [{name}] note: {note}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_rlparity diff", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="golden directory or JSON report (the reference)")
    parser.add_argument("b", type=Path, help="golden directory or JSON report (the candidate)")
    args = parser.parse_args(list(argv))
    try:
        if args.a.is_dir() and args.b.is_dir():
            layers, context = diff_goldens(args.a, args.b)
        elif args.a.is_file() and args.b.is_file():
            layers, context = diff_reports(args.a, args.b)
        else:
            print(f"diff: give two golden directories or two JSON reports ({args.a}, {args.b})", file=sys.stderr)
            return 2
    except GoldenError as exc:
        print(f"diff: {exc}", file=sys.stderr)
        return 2
    print(render(layers, context, str(args.a), str(args.b)))
    return 1 if any(layer.problems for layer in layers.values()) else 0


def _load_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(f"{path} is not a readable JSON report ({exc})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise GoldenError(f"{path} is not a pytest-rlparity report (expected format {REPORT_FORMAT!r})")
    return report


def _fmt(value: float) -> str:
    return f"{value:d}" if isinstance(value, int) else f"{value:.3g}"
