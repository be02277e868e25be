"""Mixture-of-experts routing: the engine sends each token to the experts the trainer's router picks.

An MoE model routes each token to its top-k experts in every layer. Where engine and trainer pick other
experts, that token's logprobs move by nats, not by rounding (Megatron-LM #4168 saw ~10 % of decisions
differ and 94 % of tokens differ in some layer), so no precision floor bounds it. Two checks on the same
sequences, part of the inference-path layer:

- routing agreement: per layer, the tokens whose expert set differs between engine and trainer, against
  what reduced precision explains (the precision twin's own flips against the fp32 trainer);
- routing replay (R3): the trainer forced onto the engine's routes scores as the engine does, within the
  usual calibrated bounds (the twin replays the same routes, so its floor is precision alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..compare import compare_logprobs, precision_floor
from ..settings import Tolerance
from . import causes
from .inference_path import LAYER
from .result import Finding, LayerResult

if TYPE_CHECKING:
    from ..engines.base import Routes
    from ..trainer.recompute import RoutingReference

FLIP_FACTOR = 3.0
"""A layer may flip up to this many times the tokens the precision twin flips against the fp32 trainer there
(the engine's kernels are not the twin's), ..."""
NEAR_TIES = 1
"""... plus this many tokens per layer: a router at a near-tie may flip in any precision, fp32 included."""


@dataclass(frozen=True)
class LayerRouting:
    """Routing agreement of one MoE layer over all compared positions."""

    layer: int
    positions: int
    flipped: int
    """Positions whose expert set differs between engine and trainer."""
    twin_flipped: int | None
    """The same count for the precision twin against the fp32 trainer (``None`` without a twin)."""

    @property
    def allowed(self) -> float:
        return FLIP_FACTOR * (self.twin_flipped or 0) + NEAR_TIES

    @property
    def ok(self) -> bool:
        return self.flipped <= self.allowed

    def describe(self) -> str:
        twin = "" if self.twin_flipped is None else f", the twin {self.twin_flipped}"
        return f"layer {self.layer}: {self.flipped} of {self.positions} tokens ({self.flipped / self.positions:.1%}){twin}, {self.allowed:g} allowed"


def route_flips(first: Sequence[Routes], second: Sequence[Routes]) -> dict[int, tuple[int, int]]:
    """Per layer both report: ``(positions whose expert sets differ, positions compared)`` over all sequences,
    row ``t`` against row ``t`` (the shorter of the two per sequence)."""
    totals: dict[int, tuple[int, int]] = {}
    for a, b in zip(first, second, strict=True):
        for layer in sorted(a.keys() & b.keys()):
            n = min(len(a[layer]), len(b[layer]))
            differ = (a[layer][:n].sort(dim=-1).values != b[layer][:n].sort(dim=-1).values).any(dim=-1)
            flipped, positions = totals.get(layer, (0, 0))
            totals[layer] = (flipped + int(differ.sum()), positions + n)
    return totals


def routing_agreement(engine: Sequence[Routes], reference: RoutingReference) -> list[LayerRouting]:
    """Per layer, the engine's flips against the fp32 trainer's routes beside the twin's."""
    ours = route_flips(engine, reference.routes)
    twin = route_flips(reference.twin_routes, reference.routes) if reference.twin_routes is not None else {}
    return [
        LayerRouting(layer, positions, flipped, twin[layer][0] if layer in twin else None)
        for layer, (flipped, positions) in sorted(ours.items())
    ]


def check_routing(
    engine_routes: Sequence[Routes],
    engine_scores: Sequence[Sequence[float]],
    reference: RoutingReference,
    tolerance: Tolerance,
    *,
    label: str,
    token_ids: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> LayerResult:
    """Routing agreement and routing replay of the engine on the same sequences (see the module docstring).

    ``engine_scores`` are the engine's teacher-forced logprobs of those sequences, ``reference`` the trainer's
    routes and scores (:meth:`~pytest_rlparity.trainer.recompute.Trainer.routing_reference`). The comparison it
    rests on is the replayed one; the trainer on its own routes is reported beside it, to show what replay
    removes. Cause ``moe routing`` for routes beyond what precision explains (replay then fixes the picks but
    not the router's weights of them), else ``scoring`` where the engine differs with its routes replayed."""
    # One floor for both: the twin against the fp32 trainer, both on the engine's routes (precision alone).
    floor = precision_floor(reference.twin_replayed, reference.replayed) if reference.twin_replayed is not None else None
    replayed = compare_logprobs(engine_scores, reference.replayed, tolerance, token_ids=token_ids, decode=decode, floor_stats=floor)
    own = compare_logprobs(engine_scores, reference.scores, tolerance, token_ids=token_ids, decode=decode, floor_stats=floor)
    result = LayerResult(
        LAYER, label, replayed, summary="the engine routes tokens to other experts than the trainer", extra=[own]
    )
    layers = routing_agreement(engine_routes, reference)
    result.note = "; ".join(row.describe() for row in layers) + (
        f"; mean |Δ| {own.stats['mean_abs']:.3g} on the trainer's own routes, {replayed.stats['mean_abs']:.3g} replayed"
    )
    if not layers or not sum(row.positions for row in layers):
        result.findings.append(Finding(causes.MOE_ROUTING, "no routed position was compared: engine and trainer report no common MoE layer"))
        return result
    beyond = [row for row in layers if not row.ok]
    if beyond:
        worst = max(beyond, key=lambda row: row.flipped - row.allowed)
        result.findings.append(
            Finding(
                causes.MOE_ROUTING,
                f"{len(beyond)} of {len(layers)} layers route more tokens to other experts than precision explains; worst "
                f"{worst.describe()}. Mean |Δ| {own.stats['mean_abs']:.3g} on the trainer's own routes, "
                f"{replayed.stats['mean_abs']:.3g} with the engine's replayed",
            )
        )
    elif not replayed.ok:  # routes agree: whatever is left, routing does not explain
        result.findings.append(
            Finding(causes.SCORING, "engine and trainer route alike, and with the engine's routes replayed the trainer still scores otherwise")
        )
    return result
