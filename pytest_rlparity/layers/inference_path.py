"""Inference-path layer: the same tokens get the same logprobs whatever path the engine takes.

Once logprobs mean the right thing (semantic layer), the remaining mismatch in the seed
post came from the *path*: runtime defaults (prefix caching, async scheduling), the
in-flight weight update, and the precision of the final projection. The checks here
compare two paths over the same tokens, and when a weight update is involved, find out
which weights the engine is really using:

- the new ones (pass);
- the previous ones: the update silently changed nothing (stale weights);
- a mix: a partial update, named by the tensors left behind;
- the new ones once the prefix cache is dropped: cached KV from before the update was reused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..compare import Comparison, compare_logprobs
from ..settings import SamplingSettings, Tolerance
from .report import Finding, LayerReport

if TYPE_CHECKING:
    import torch

    from ..engines.base import Completion
    from ..trainer.recompute import Trainer

LAYER = "inference_path"


def path_report(label: str, comparison: Comparison) -> LayerReport:
    return LayerReport(LAYER, label, comparison, summary="the engine's path changes the logprobs")


def compare_paths(
    reference: Sequence[Sequence[float]],
    candidate: Sequence[Sequence[float]],
    tolerance: Tolerance,
    *,
    label: str,
    cause: str,
    hint: str,
    token_ids: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> LayerReport:
    """Logprobs of the same tokens along two paths; a difference is attributed to ``cause``."""
    comparison = compare_logprobs(candidate, reference, tolerance, token_ids=token_ids, decode=decode)
    report = path_report(label, comparison)
    if not comparison.ok:
        report.findings.append(Finding(cause, hint))
    return report


def same_tokens(first: Sequence[Completion], second: Sequence[Completion], *, label: str, cause: str) -> LayerReport | None:
    """A finding if two runs that should be identical sampled different tokens."""
    for i, (a, b) in enumerate(zip(first, second)):
        if a.token_ids != b.token_ids:
            at = next((p for p, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
            comparison = compare_logprobs([a.logprobs[:at]], [b.logprobs[:at]])
            report = path_report(label, comparison)
            report.findings.append(
                Finding(cause, f"request {i} sampled different tokens from position {at} on ({a.token_ids[at:at + 3]} vs {b.token_ids[at:at + 3]})")
            )
            return report
    return None


def check_after_update(
    engine: Any,
    trainer: Trainer,
    history: Sequence[dict[str, torch.Tensor]],
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    tolerance: Tolerance,
) -> LayerReport:
    """After weight update ``len(history) - 1``, the engine must match the trainer's latest weights.

    ``history`` holds the trainer's weights per version, oldest first; the trainer holds
    the last. On a mismatch the report says which weights the engine is really using.
    """
    version = len(history) - 1
    completions = engine.generate(prompts, settings)
    fit = _Fit(trainer, completions, settings, tolerance)
    current = fit.compare(history[-1])
    label = f"after weight update v{version}"
    report = path_report(label, current)
    if current.ok:
        return report
    cached = [c.cached_tokens or 0 for c in completions]
    if any(cached):
        engine.reset_prefix_cache()
        retry = engine.generate(prompts, settings)
        if _Fit(trainer, retry, settings, tolerance).compare(history[-1]).ok:
            report.findings.append(
                Finding(
                    "stale prefix cache",
                    f"prefix-cache hits ({sum(1 for n in cached if n)} requests, up to {max(cached)} cached tokens) reused KV "
                    f"computed before update v{version}; the same requests match once the cache is reset. "
                    "Call reset_prefix_cache() after every weight update.",
                )
            )
            return report
    if version >= 1 and fit.compare(history[-2]).ok:
        report.findings.append(
            Finding(
                "stale weights",
                f"after update v{version} the engine still matches trainer weights v{version - 1}: the update changed "
                "nothing the engine computes with (e.g. writing named_parameters() that the CPU kernels have repacked). "
                "Use the engine's reload path (vLLM: collective_rpc('reload_weights', ...)).",
            )
        )
        return report
    if version >= 1:
        changed, old, mixed = fit.locate(history[-2], history[-1])
        if mixed.ok:
            arrived = [n for n in changed if n not in old]
            if len(arrived) < len(old):
                detail = (
                    f"only {summarize(arrived)} reached the engine; {summarize(old)} still hold v{version - 1} "
                    "(writes into named_parameters() miss fused or repacked kernel weights: use the engine's reload path)"
                )
            else:
                detail = f"the engine matches the new weights except {summarize(old)}, which still hold v{version - 1}"
            report.findings.append(
                Finding("partial update", f"after update v{version} {detail}: part of the update did not arrive.")
            )
            return report
    report.findings.append(
        Finding(
            "weights",
            f"after update v{version} the engine matches neither the new nor the previous trainer weights: "
            "check the update path, dtype and lm_head precision.",
        )
    )
    return report


class _Fit:
    """Engine logprobs vs the trainer's recompute under a given set of weights."""

    def __init__(self, trainer: Trainer, completions: Sequence[Completion], settings: SamplingSettings, tolerance: Tolerance) -> None:
        self.trainer = trainer
        self.completions = completions
        self.settings = settings
        self.tolerance = tolerance

    def compare(self, state: dict[str, torch.Tensor]) -> Comparison:
        with self.trainer.weights(state):
            recompute = self.trainer.recompute(self.completions, self.settings)
        return compare_logprobs([c.logprobs for c in self.completions], recompute.processed, self.tolerance)

    def locate(
        self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], max_passes: int = 3
    ) -> tuple[list[str], list[str], Comparison]:
        """Greedy search for the tensors the engine still holds at ``old``: start from ``new``,
        flip a tensor back to ``old`` whenever that fits the engine better.

        Returns the tensors that differ between versions, those found stale, and the fit.
        """
        changed = [k for k in new if not bool((new[k] == old[k]).all())]
        stale: set[str] = set()
        best = self.compare(new)
        for _ in range(max_passes):
            improved = False
            for name in changed:
                trial = stale ^ {name}
                candidate = self.compare({k: (old[k] if k in trial else new[k]) for k in new})
                if candidate.stats.get("mean_abs", float("inf")) < best.stats.get("mean_abs", float("inf")):
                    stale, best, improved = trial, candidate, True
            if improved is False or best.ok:
                break
        return changed, sorted(stale), best


def summarize(names: Sequence[str]) -> str:
    """``model.layers.1.*`` for whole layers, tensor names otherwise."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.match(r"(.*?\.layers\.\d+)\.", name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    parts = [f"{prefix}.* ({len(items)} tensors)" if len(items) > 1 else items[0] for prefix, items in groups.items()]
    return ", ".join(parts) if parts else "no tensor"
