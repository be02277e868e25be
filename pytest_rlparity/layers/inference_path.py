"""Inference-path layer: the same tokens get the same logprobs whatever path the engine takes.

Once logprobs mean the right thing (semantic layer), the remaining mismatch in the seed
post came from the *path*: runtime defaults (prefix caching, async scheduling), the
in-flight weight update, and the precision of the final projection. The checks here
compare two paths over the same tokens; the checks of a weight update, the path that
changes the weights themselves, are :mod:`.weight_updates`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..compare import Comparison, compare_logprobs
from ..settings import Tolerance
from . import causes
from .causes import Cause
from .result import Finding, LayerResult

if TYPE_CHECKING:
    from ..engines.base import Completion

LAYER = "inference_path"


def path_result(label: str, comparison: Comparison) -> LayerResult:
    return LayerResult(LAYER, label, comparison, summary="the engine's path changes the logprobs")


def compare_paths(
    reference: Sequence[Sequence[float]],
    candidate: Sequence[Sequence[float]],
    tolerance: Tolerance,
    *,
    label: str,
    cause: Cause,
    hint: str,
    token_ids: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    twin: Sequence[Sequence[float]] | None = None,
    floor_stats: dict[str, float] | None = None,
) -> LayerResult:
    """Logprobs of the same tokens along two paths; a difference is attributed to ``cause``.

    With a calibrated tolerance: ``twin`` when ``reference`` is the fp32 trainer, else ``floor_stats``
    (see :func:`~pytest_rlparity.compare.compare_logprobs`).
    """
    comparison = compare_logprobs(
        candidate, reference, tolerance, token_ids=token_ids, decode=decode, twin=twin, floor_stats=floor_stats
    )
    result = path_result(label, comparison)
    if not comparison.ok:
        result.findings.append(Finding(cause, hint))
    return result


def same_tokens(first: Sequence[Completion], second: Sequence[Completion], *, label: str, cause: Cause) -> LayerResult | None:
    """A finding if two runs that should be identical sampled different tokens."""
    for i, (a, b) in enumerate(zip(first, second)):
        if a.token_ids != b.token_ids:
            at = next((p for p, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
            comparison = compare_logprobs([a.logprobs[:at]], [b.logprobs[:at]])
            result = path_result(label, comparison)
            result.findings.append(
                Finding(cause, f"request {i} sampled different tokens from position {at} on ({a.token_ids[at:at + 3]} vs {b.token_ids[at:at + 3]})")
            )
            return result
    return None


def check_budget(
    engine: Sequence[Sequence[float]],
    trainer: Sequence[Sequence[float]],
    twin: Sequence[Sequence[float]],
    budget: float,
    *,
    label: str,
    token_ids: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> LayerResult:
    """A reduced-precision path that costs precision by design (an fp8 KV cache): its mismatch against the
    fp32 trainer as a multiple of the bf16 precision floor (``twin``: the trainer in bf16), judged against
    ``budget`` times that floor's mean |Δ|; the ratios of the other statistics are reported beside it."""
    tolerance = Tolerance(max_abs=None, mean_abs=None, mean_offset=None, k3_kl=None, prob_diff_mean=None,
                          floor_factors={"mean_abs": budget, "out_of_support": budget})
    comparison = compare_logprobs(engine, trainer, tolerance, token_ids=token_ids, decode=decode, twin=twin, sampled=True)
    ratios = comparison.floor_ratios(("mean_abs", "k3_kl", "mean_offset"))
    result = path_result(label, comparison)
    result.summary = "the path costs more than its budget"
    if not comparison.ok:
        result.findings.append(
            Finding(
                causes.FP8_BUDGET,
                f"mean |Δ| {ratios.get('mean_abs', float('nan')):.2g}x the bf16 floor against a budget of {budget:g}x "
                f"(k3 {ratios.get('k3_kl', float('nan')):.2g}x, mean offset {ratios.get('mean_offset', float('nan')):.2g}x)",
            )
        )
    return result

