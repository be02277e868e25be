"""Golden snapshots: what an engine produced once, with what produced it, compared under tolerance.

A golden is a small JSON file (never pickle: loading one executes nothing) holding the
token ids and logprobs of a check's rollouts, the check's statistics, and provenance:
engine and version, engine kwargs, model fingerprint, library versions, device, dtype.
Goldens live under ``<golden dir>/<device>-<dtype>/<layer>/<test>.json`` so each platform
keeps its own.

Goldens are written only when asked (``--rlparity-update-goldens``, or syrupy's
``--snapshot-update``): missing or out-of-tolerance ones are then (re)recorded, and with
``--rlparity-update-goldens=all`` every golden touched is rewritten. Writes go through a
temporary file and an atomic rename, so a crash or concurrent xdist worker never leaves
half a file.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GoldenError
from .files import safe_name, write_atomic
from .layers import causes
from .numerics import GoldenTolerance
from .checks import publish
from .settings import FLOOR_LIMITS

if TYPE_CHECKING:
    from .compare import Comparison

FORMAT = "pytest-rlparity-golden/1"

IDENTITY_KEYS = ("model_fingerprint", "engine", "device", "dtype")
"""Provenance that must match for numbers to be comparable; a difference is reported as such."""

NOTED_KEYS = ("engine_kwargs", "engine_version", "torch", "transformers", "plugin_version")
"""Provenance that users change and want judged (runtime settings, an upgrade): the numbers are
compared, and what changed is shown beside the verdict."""

MIGRATION_KEYS = ("engine",)
"""Identity that a migration (``--rlparity-baseline``) is allowed to change: it is what is under test."""

MIGRATION_IDENTITY_KEYS = tuple(k for k in IDENTITY_KEYS if k not in MIGRATION_KEYS)
MIGRATION_NOTED_KEYS = (*MIGRATION_KEYS, *NOTED_KEYS)

UPDATE_MODES = ("off", "mismatch", "all")

NON_FINITE = ("inf", "-inf", "nan")
"""How a golden stores the floats JSON cannot hold."""

DRAWN_SETTINGS = ("seed", "stop_token_ids")
"""Sampling settings that another draw may change: the seed, and what a case derives from its
rollouts (the stop-token case stops at the run's most frequent token)."""

@dataclass
class Snapshot:
    """What a check stores: the rollouts it judged and its statistics."""

    sequences: list[dict[str, list[Any]]]
    """Each ``{"prompt": [ids], "tokens": [ids], "logprobs": [floats]}``."""
    stats: dict[str, float]
    sampling: dict[str, Any] | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)
    """Per metric, one value per training step (objective layer)."""
    summaries: dict[str, list[float]] = field(default_factory=dict)
    """Per run summary (:func:`~pytest_rlparity.layers.objective.curve_summaries`), one value per run
    (seed): the band a later run must land in."""


class GoldenStore:
    """Reads, compares and (when asked) writes the goldens under one directory."""

    def __init__(self, root: Path, mode: str, update_hint: str, *, migration: bool = False) -> None:
        if mode not in UPDATE_MODES:
            raise ValueError(f"golden update mode {mode!r} not in {UPDATE_MODES}")
        if migration and mode != "off":
            raise ValueError("goldens of a migration baseline are read-only")
        self.root = root
        self.mode = mode
        self.migration = migration
        self.update_hint = update_hint
        self.allowed: list[str] = []
        """Goldens this store matched with allowed differences (changed settings, other tokens), one line
        each. The run's summary reads them from the published entries, which travel with xdist."""

    def path_for(self, platform: str, layer: str, name: str) -> Path:
        return self.root / platform / layer / (safe_name(name) + ".json")

    def check(
        self,
        path: Path,
        snapshot: Snapshot,
        tolerance: GoldenTolerance,
        *,
        provenance: dict[str, Any],
        nodeid: str,
    ) -> str | None:
        """Compare ``snapshot`` with the golden at ``path``; return a note if one was written.

        Raises :class:`GoldenError` when the golden is missing, unreadable, from another
        model or configuration, or out of tolerance, unless updating was asked for. In
        migration mode the golden may come from another engine or engine version: those
        differences are reported, the numbers are still compared, nothing is written.
        """
        rerecord = f"{self.update_hint} {shlex.quote(nodeid)} --rlparity-update-goldens"
        replace = f"{rerecord}=all"
        entry: dict[str, Any] = {"kind": "golden", "label": f"golden {path.parent.name}/{path.name}", "path": str(path)}
        if not path.exists():
            if self.mode == "off":
                publish({**entry, "verdict": "fail", "findings": [{"cause": str(causes.GOLDEN), "message": "missing"}]})
                raise GoldenError(f"no golden at {path}{self._platforms_hint(path)}.\nRecord it with: {rerecord}")
            self._write(path, snapshot, provenance)
            note = f"golden created: {path}"
            publish({**entry, "verdict": "created", "note": note})
            return note
        if self.mode == "all":
            self._write(path, snapshot, provenance)
            note = f"golden rewritten: {path}"
            publish({**entry, "verdict": "rewritten", "note": note})
            return note
        golden = load(path, replace)
        entry["golden_provenance"] = golden.get("provenance", {})
        problems = identity_differences(golden.get("provenance", {}), provenance, self.identity_keys)
        diff = GoldenDiff(problems)
        if not problems:
            diff = compare_golden(golden, snapshot, tolerance, migration=self.migration)
        noted = noted_differences(golden.get("provenance", {}), provenance, self.noted_keys)
        entry.update(distance=diff.distance, notes=diff.notes, changed=noted)
        if not diff.problems:
            allowed = f"{path.parent.name}/{path.name}: {'; '.join([*noted, *diff.notes][:2])}" if diff.notes or noted else None
            publish({**entry, "verdict": "match", **({"allowed": allowed} if allowed else {})})
            if allowed:
                self.allowed.append(allowed)
            return None
        if self.mode == "mismatch":
            self._write(path, snapshot, provenance)
            note = f"golden re-recorded ({diff.problems[0]}): {path}"
            publish({**entry, "verdict": "re-recorded", "note": note, "findings": [{"cause": str(causes.GOLDEN), "message": p} for p in diff.problems]})
            return note
        publish({**entry, "verdict": "fail", "findings": [{"cause": str(causes.GOLDEN), "message": p} for p in diff.problems]})
        raise GoldenError(
            f"this run differs from the golden {path}:\n  - "
            + "\n  - ".join(diff.problems)
            + (f"\nchanged since the golden was recorded: {'; '.join(noted)}" if noted else "")
            + (f"\nallowed differences: {'; '.join(diff.notes)}" if diff.notes else "")
            + f"\nIf the change is intended, re-snapshot with: {rerecord}",
            headline=f"golden {path.name}: {diff.problems[0]}",
        )

    @property
    def identity_keys(self) -> tuple[str, ...]:
        return MIGRATION_IDENTITY_KEYS if self.migration else IDENTITY_KEYS

    @property
    def noted_keys(self) -> tuple[str, ...]:
        return MIGRATION_NOTED_KEYS if self.migration else NOTED_KEYS

    def _platforms_hint(self, path: Path) -> str:
        """Which platforms the golden directory does hold, when this one has nothing."""
        platform_dir = path.parent.parent
        if platform_dir.exists() or not self.root.exists():
            return ""
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        return f" ({self.root} holds goldens for {', '.join(found) or 'no platform'}, none for {platform_dir.name})"

    def _write(self, path: Path, snapshot: Snapshot, provenance: dict[str, Any]) -> None:
        document = {
            "format": FORMAT,
            "provenance": provenance,
            "sampling": snapshot.sampling,
            "stats": {k: _encode(v) for k, v in snapshot.stats.items()},
            "sequences": [{k: [_encode(x) for x in v] for k, v in seq.items()} for seq in snapshot.sequences],
        }
        if snapshot.curves:
            document["curves"] = {k: [_encode(x) for x in v] for k, v in snapshot.curves.items()}
        if snapshot.summaries:
            document["summaries"] = {k: [_encode(x) for x in v] for k, v in snapshot.summaries.items()}
        write_atomic(path, dumps(document))


def load(path: Path, rerecord: str = "pytest --rlparity --rlparity-update-goldens=all") -> dict[str, Any]:
    """Read a golden; never executes anything. Raises :class:`GoldenError` on anything malformed,
    saying how to get a good file back (``rerecord`` replaces an unreadable one)."""
    fix = f"Restore it from version control (git checkout -- {shlex.quote(str(path))}) or replace it with: {rerecord}"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(f"the golden {path} is unreadable ({exc}). {fix}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise GoldenError(
            f"the golden {path} has format {found!r}, expected {FORMAT!r}: it was not written by this "
            f"version of pytest-rlparity. {fix}"
        )
    problem = _malformed(document)
    if problem:
        raise GoldenError(f"the golden {path} is damaged: {problem}. {fix}")
    for seq in document.get("sequences", []):
        for key, values in seq.items():
            seq[key] = [_decode(v) for v in values]
    document["stats"] = {k: _decode(v) for k, v in document.get("stats", {}).items()}
    for key in ("curves", "summaries"):
        document[key] = {k: [_decode(x) for x in v] for k, v in document.get(key, {}).items()}
    return document


def _malformed(document: dict[str, Any]) -> str | None:
    """What in a golden's structure is not what :meth:`GoldenStore._write` writes, or ``None``."""
    def number(value: Any) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in NON_FINITE

    def numbers(where: str, values: Any) -> str | None:
        if not isinstance(values, list):
            return f"{where} is a {type(values).__name__}, not a list"
        bad = next((v for v in values if not number(v)), None)
        return f"{where} holds {bad!r}, not a number" if bad is not None else None

    for key in ("provenance", "stats", "curves", "summaries"):
        if not isinstance(document.get(key, {}), dict):
            return f"{key!r} is a {type(document[key]).__name__}, not an object"
    if document.get("sampling") is not None and not isinstance(document["sampling"], dict):
        return f"'sampling' is a {type(document['sampling']).__name__}, not an object"
    sequences = document.get("sequences", [])
    if not isinstance(sequences, list):
        return f"'sequences' is a {type(sequences).__name__}, not a list"
    for i, seq in enumerate(sequences):
        if not isinstance(seq, dict):
            return f"sequence {i} is a {type(seq).__name__}, not an object"
        for key, values in seq.items():
            if (found := numbers(f"sequence {i} {key!r}", values)) is not None:
                return found
    for name, value in document.get("stats", {}).items():
        if not number(value):
            return f"statistic {name!r} is {value!r}, not a number"
    for key in ("curves", "summaries"):
        for name, values in document.get(key, {}).items():
            if (found := numbers(f"{key} {name!r}", values)) is not None:
                return found
    return None


def identity_differences(golden: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = IDENTITY_KEYS) -> list[str]:
    """Plain-language differences in what produced the golden vs this run."""
    found = []
    for key in keys:
        old, new = golden.get(key), current.get(key)
        if old == new:
            continue
        if key == "model_fingerprint":
            found.append(f"recorded with another model (fingerprint {old} there, {new} here)")
        else:
            found.append(f"recorded with {key} {old!r}, this run uses {new!r}")
    return found


def noted_differences(golden: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = NOTED_KEYS) -> list[str]:
    """``engine kwargs (enable_prefix_caching: False -> True)``, ``engine_version: a -> b``: provenance
    that differs without making the numbers incomparable."""
    found = []
    for key in keys:
        old, new = golden.get(key), current.get(key)
        if old == new:
            continue
        if key == "engine_kwargs" and isinstance(old, dict) and isinstance(new, dict):
            found.append(f"engine kwargs ({changed_items(old, new)})")
        else:
            found.append(f"{key}: {old} -> {new}")
    return found


def changed_items(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``a: 1 -> 2, b: '<unset>' -> 3`` for the keys whose values differ."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys)


@dataclass
class GoldenDiff:
    """How a snapshot differs from its golden: problems beyond tolerance, allowed differences, distances."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Differences that are allowed, e.g. rollouts that sampled other tokens."""
    distance: dict[str, float] = field(default_factory=dict)
    """``max_abs_logprob`` and ``tokens_compared`` over identical token prefixes; per on-policy curve, the
    worst step's |diff| as a fraction of its band (``curve_<name>``); per statistic, |diff| (``stat_<name>``);
    per run summary, how far outside the recorded seeds' band (``summary_<name>``, 0 inside)."""


def compare_snapshots(golden: dict[str, Any], snapshot: Snapshot, tolerance: GoldenTolerance) -> GoldenDiff:
    """Token-level, curve, summary and statistic differences beyond tolerance.

    Logprobs are compared where golden and snapshot hold the same tokens. Sampled tokens may
    diverge (another seed, another machine's rounding at a near-tie, another engine's random
    numbers): the common prefix is compared and the divergence is noted. A golden whose
    sequences or steps do not line up with the run's is a problem, never an empty comparison.
    """
    diff = GoldenDiff()
    old_seqs = golden.get("sequences", [])
    if len(old_seqs) != len(snapshot.sequences):
        diff.problems.append(f"{len(old_seqs)} sequences in the golden, {len(snapshot.sequences)} now")
        return diff
    worst: tuple[float, int, int] = (0.0, -1, -1)
    compared = 0
    diverged: list[tuple[int, int]] = []
    for i, (old, new) in enumerate(zip(old_seqs, snapshot.sequences)):
        if old.get("prompt") != new.get("prompt"):
            diff.problems.append(f"sequence {i}: the prompt differs from the golden's (the suite's prompts changed)")
            continue
        old_tokens, new_tokens = old.get("tokens", []), new.get("tokens", [])
        old_lps, new_lps = old.get("logprobs", []), new.get("logprobs", [])
        if len(old_lps) - len(old_tokens) != len(new_lps) - len(new_tokens):
            diff.problems.append(f"sequence {i}: {len(old_tokens)} tokens and {len(old_lps)} logprobs in the golden, "
                                 f"{len(new_tokens)} and {len(new_lps)} now")
            continue
        common = next((p for p, (a, b) in enumerate(zip(old_tokens, new_tokens)) if a != b), min(len(old_tokens), len(new_tokens)))
        if old_tokens != new_tokens:
            diverged.append((i, common))
        for pos, (a, b) in enumerate(zip(old_lps[:common], new_lps[:common])):
            compared += 1
            gap = abs(a - b) if math.isfinite(a) and math.isfinite(b) else (0.0 if a == b else math.inf)
            if gap > worst[0]:
                worst = (gap, i, pos)
    if old_seqs:
        diff.distance.update(max_abs_logprob=worst[0], tokens_compared=compared, sequences_diverged=len(diverged))
    if diverged:
        first = min(diverged, key=lambda d: d[1])
        diff.notes.append(
            f"{len(diverged)} of {len(old_seqs)} sequences sample other tokens than the golden (first at sequence "
            f"{first[0]}, position {first[1]}); logprobs compared on the {compared} token(s) before the divergence"
        )
    if any(seq.get("tokens") for seq in old_seqs) and not compared:
        diff.problems.append(NOTHING_COMPARED)
    atol = drift_bound(tolerance, golden.get("stats", {}).get("floor_max_abs", 0.0))
    if atol is None:
        diff.problems.append(
            f"the golden's precision floor (floor_max_abs {golden['stats']['floor_max_abs']!r}) is not finite or "
            f"beyond {FLOOR_LIMITS['max_abs']:g}: it cannot scale the drift bound; re-snapshot the golden"
        )
    elif not worst[0] <= atol:
        gap, i, pos = worst
        diff.problems.append(
            f"logprobs drift from the golden by up to {gap:.3g} > {atol:.3g} "
            f"(sequence {i}, position {pos}: golden {old_seqs[i]['logprobs'][pos]:.6g}, now {snapshot.sequences[i]['logprobs'][pos]:.6g})"
        )
    _compare_curves(golden.get("curves", {}), snapshot.curves, tolerance, diff)
    _compare_summaries(golden.get("summaries", {}), snapshot.summaries, tolerance, diff)
    old_stats = golden.get("stats", {})
    for name, atol in tolerance.stats_atol.items():
        if name in old_stats and name in snapshot.stats:
            old, new = old_stats[name], snapshot.stats[name]
            delta = abs(new - old) if math.isfinite(old) and math.isfinite(new) else math.inf
            diff.distance[f"stat_{name}"] = delta
            if not delta <= atol:
                diff.problems.append(f"statistic {name}: golden {old:.4g}, now {new:.4g} (|diff| > {atol:g})")
    return diff


NOTHING_COMPARED = (
    "no logprob was compared with the golden: every sequence samples another token than the golden at position 0, "
    "so its tokens checked nothing (another sampler, seed or model than the golden's? refresh it with "
    "--rlparity-update-goldens if the change is intended)"
)


def drift_bound(tolerance: GoldenTolerance, floor_max_abs: float) -> float | None:
    """The per-token drift allowed from a golden: the absolute bound, or the golden's own precision floor
    times its factor where larger (so never above that factor times
    :data:`~pytest_rlparity.settings.FLOOR_LIMITS`'s ``max_abs``); ``None`` for a floor that cannot scale
    a bound (not finite, or beyond that limit)."""
    if not 0.0 <= floor_max_abs <= FLOOR_LIMITS["max_abs"]:
        return None
    return max(tolerance.logprob_atol, tolerance.logprob_floor_factor * floor_max_abs)


def _compare_curves(old_curves: dict[str, list[float]], new_curves: dict[str, list[float]], tolerance: GoldenTolerance, diff: GoldenDiff) -> None:
    """Every step of an on-policy curve inside its band around the golden."""
    for name, band in tolerance.curve_bands.items():
        old, new = old_curves.get(name), new_curves.get(name)
        if old is None and new is None:
            continue
        if old is None or new is None or len(old) != len(new):
            diff.problems.append(f"curve {name}: {len(old or [])} steps in the golden, {len(new or [])} now")
            continue
        gaps = [abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf for a, b in zip(old, new)]
        diff.distance[f"curve_{name}"] = max(gaps, default=0.0) / band
        outside = [i for i, g in enumerate(gaps) if not g <= band]
        if outside:
            i = outside[0]
            diff.problems.append(f"curve {name} leaves its golden band (±{band:g}) at step {i}: golden {old[i]:.4g}, now {new[i]:.4g}")


def _compare_summaries(old: dict[str, list[float]], new: dict[str, list[float]], tolerance: GoldenTolerance, diff: GoldenDiff) -> None:
    """Each run's summary inside the range of the recorded seeds, widened on each side by that range
    (or the slack, if larger): with four seeds a fifth lands outside their bare range 2 times in 5."""
    for name, slack in tolerance.summary_slack.items():
        recorded, now = old.get(name), new.get(name)
        if recorded is None and now is None:
            continue
        if not recorded or not now:
            diff.problems.append(f"summary {name}: {len(recorded or [])} recorded run(s) in the golden, {len(now or [])} now")
            continue
        widen = max(slack, max(recorded) - min(recorded))
        low, high = min(recorded) - widen, max(recorded) + widen
        outside = [v for v in now if not low <= v <= high]
        diff.distance[f"summary_{name}"] = max((max(low - v, v - high, 0.0) if math.isfinite(v) else math.inf for v in now), default=0.0)
        if outside:
            diff.problems.append(
                f"{name} {outside[0]:.4g} is outside the band of {len(recorded)} recorded seed(s) "
                f"[{min(recorded):.4g}, {max(recorded):.4g}] ± {widen:.3g}"
            )


def compare_golden(golden: dict[str, Any], snapshot: Snapshot, tolerance: GoldenTolerance, *, migration: bool) -> GoldenDiff:
    """Sampling settings, then the numbers.

    Another sampling seed is another draw of the same check (with the settings a case derives
    from its rollouts, :data:`DRAWN_SETTINGS`): noted, and compared, on the statistics alone where
    every sequence draws another first token; with the golden's own seed that is a problem. Other
    sampling settings make the numbers incomparable, except in a migration, where a case may
    have adapted its settings to the other sampler (another seed until EOS is drawn, that
    sampler's most frequent token as stop token).
    """
    old, new = golden.get("sampling") or {}, snapshot.sampling or {}
    changed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if changed and not migration and not ("seed" in changed and changed <= set(DRAWN_SETTINGS)):
        return GoldenDiff([sampling_difference(old, new)])
    diff = compare_snapshots(golden, snapshot, tolerance)
    if changed:
        diff.notes.insert(0, sampling_difference(old, new))
    redrawn = "another sampler" if migration else "another seed" if "seed" in changed else None
    if redrawn and NOTHING_COMPARED in diff.problems:  # another draw may differ from its first token: expected
        diff.problems.remove(NOTHING_COMPARED)
        diff.notes.append(f"no sampled token matches the golden's at position 0 ({redrawn}): only the statistics were compared")
    return diff


def sampling_difference(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    """``recorded with other sampling settings (seed: 0 -> 1000)``."""
    return f"recorded with other sampling settings ({changed_items(old or {}, new or {})})"


def dumps(document: dict[str, Any]) -> str:
    """JSON with one line per sequence, so a diff shows which rollout changed."""
    lines = ["{"]
    items = list(document.items())
    for n, (key, value) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if key == "sequences":
            rows = [json.dumps(seq, separators=(",", ":")) for seq in value]
            body = ",\n    ".join(rows)
            lines.append(f'  "sequences": [\n    {body}\n  ]{comma}' if rows else f'  "sequences": []{comma}')
        else:
            rendered = json.dumps(value, indent=2, sort_keys=True).replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {rendered}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _encode(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else str(value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in NON_FINITE:
        return float(value)
    return value


def snapshot_from(completions: Any, comparison: Comparison, sampling: dict[str, Any] | None) -> Snapshot:
    """A snapshot of an engine's completions (prompt, sampled tokens, their logprobs) and the check's statistics."""
    return Snapshot(
        sequences=[{"prompt": list(c.prompt_ids), "tokens": list(c.token_ids), "logprobs": list(c.logprobs)} for c in completions],
        stats=comparison.recorded_stats(),
        sampling=sampling,
    )
