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

FORMAT = "pytest-rlparity-golden/1"

IDENTITY_KEYS = ("model_fingerprint", "engine", "engine_kwargs", "device", "dtype")
"""Provenance that must match for numbers to be comparable; a difference is reported as such."""

NOTED_KEYS = ("engine_version", "torch", "transformers", "plugin_version")
"""Provenance that may legitimately differ (an upgrade under test) and is shown when a check fails."""

UPDATE_MODES = ("off", "mismatch", "all")


@dataclass(frozen=True)
class GoldenTolerance:
    """How far a run may drift from its golden."""

    logprob_atol: float
    """Per-token |now - golden| for the same token ids."""
    stats_atol: dict[str, float] = field(default_factory=dict)
    """Per statistic |now - golden|; statistics not listed are recorded but not compared."""
    curve_bands: dict[str, float] = field(default_factory=dict)
    """Per curve, the half-width of the band every step must stay in."""


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
    ),
}
GOLDEN_TOLERANCES["float16"] = GOLDEN_TOLERANCES["bfloat16"]


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

    def __init__(self, root: Path, mode: str, update_hint: str) -> None:
        if mode not in UPDATE_MODES:
            raise ValueError(f"golden update mode {mode!r} not in {UPDATE_MODES}")
        self.root = root
        self.mode = mode
        self.update_hint = update_hint
        self.written: list[Path] = []

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
        model or configuration, or out of tolerance, unless updating was asked for.
        """
        rerecord = f"{self.update_hint} {nodeid!r}"
        if not path.exists():
            if self.mode == "off":
                raise GoldenError(f"no golden at {path}.\nRecord it with: {rerecord}")
            self._write(path, record, provenance)
            return f"golden created: {path}"
        golden = load(path, rerecord)
        if self.mode == "all":
            self._write(path, record, provenance)
            return f"golden rewritten: {path}"
        problems = identity_differences(golden.get("provenance", {}), provenance)
        if not problems:
            problems = _compare_sampling(golden, record) or compare_records(golden, record, tolerance)
        if not problems:
            return None
        if self.mode == "mismatch":
            self._write(path, record, provenance)
            return f"golden re-recorded ({problems[0]}): {path}"
        noted = _noted_differences(golden.get("provenance", {}), provenance)
        raise GoldenError(
            f"this run differs from the golden {path}:\n  - "
            + "\n  - ".join(problems)
            + (f"\nprovenance that also differs: {'; '.join(noted)}" if noted else "")
            + f"\nIf the change is intended, re-record with: {rerecord}",
            headline=f"golden {path.name}: {problems[0]}",
        )

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
        self.written.append(path)


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


def identity_differences(golden: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Plain-language differences in what produced the golden vs this run."""
    found = []
    for key in IDENTITY_KEYS:
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


def compare_records(golden: dict[str, Any], record: GoldenRecord, tolerance: GoldenTolerance) -> list[str]:
    """Token-level and statistic-level differences beyond tolerance, worst first."""
    problems = []
    old_seqs = golden.get("sequences", [])
    if len(old_seqs) != len(record.sequences):
        return [f"{len(old_seqs)} sequences in the golden, {len(record.sequences)} now"]
    worst: tuple[float, int, int] = (0.0, -1, -1)
    for i, (old, new) in enumerate(zip(old_seqs, record.sequences)):
        if old.get("prompt") != new.get("prompt"):
            problems.append(f"sequence {i}: the prompt differs from the golden's (the suite's prompts changed)")
            continue
        old_tokens, new_tokens = old.get("tokens", []), new.get("tokens", [])
        if old_tokens != new_tokens:
            at = next((p for p, (a, b) in enumerate(zip(old_tokens, new_tokens)) if a != b), min(len(old_tokens), len(new_tokens)))
            problems.append(
                f"sequence {i}: sampled tokens diverge from the golden at position {at} "
                f"(golden {old_tokens[at:at + 3]}, now {new_tokens[at:at + 3]})"
            )
            continue
        for pos, (a, b) in enumerate(zip(old.get("logprobs", []), new.get("logprobs", []))):
            diff = abs(a - b) if math.isfinite(a) and math.isfinite(b) else (0.0 if a == b else math.inf)
            if diff > worst[0]:
                worst = (diff, i, pos)
    if worst[0] > tolerance.logprob_atol:
        diff, i, pos = worst
        old_lp = old_seqs[i]["logprobs"][pos]
        new_lp = record.sequences[i]["logprobs"][pos]
        problems.append(
            f"logprobs drift from the golden by up to {diff:.3g} > {tolerance.logprob_atol:g} "
            f"(sequence {i}, position {pos}: golden {old_lp:.6g}, now {new_lp:.6g})"
        )
    old_curves = golden.get("curves", {})
    for name, band in tolerance.curve_bands.items():
        old, new = old_curves.get(name), record.curves.get(name)
        if old is None or new is None:
            continue
        if len(old) != len(new):
            problems.append(f"curve {name}: {len(old)} steps in the golden, {len(new)} now")
            continue
        outside = [(i, a, b) for i, (a, b) in enumerate(zip(old, new)) if abs(a - b) > band]
        if outside:
            i, a, b = outside[0]
            problems.append(f"curve {name} leaves its golden band (±{band:g}) at step {i}: golden {a:.4g}, now {b:.4g}")
    old_stats = golden.get("stats", {})
    for name, atol in tolerance.stats_atol.items():
        if name in old_stats and name in record.stats:
            delta = abs(record.stats[name] - old_stats[name])
            if delta > atol:
                problems.append(f"statistic {name}: golden {old_stats[name]:.4g}, now {record.stats[name]:.4g} (|diff| > {atol:g})")
    return problems


def _compare_sampling(golden: dict[str, Any], record: GoldenRecord) -> list[str]:
    if golden.get("sampling") != record.sampling:
        return [f"recorded with other sampling settings ({golden.get('sampling')} there, {record.sampling} here)"]
    return []


def _noted_differences(golden: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{k}: {golden.get(k)} -> {current.get(k)}" for k in NOTED_KEYS if golden.get(k) != current.get(k)]


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
