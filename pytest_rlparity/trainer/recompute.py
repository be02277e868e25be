"""The tiny trainer's recompute: teacher-forced logprobs of the engine's own rollouts.

This is what an RL trainer does before its loss: feed prompt + completion through its
own copy of the policy (:class:`~pytest_rlparity.policy.Policy`) and read the logprob of each
sampled token under the same *processed* distribution the sampler drew from.

A trainer can carry a *precision twin*: the same weights in the engine's reduced precision.
Its recompute of the same tokens is the model's precision floor, what a bf16 engine is
judged against (:mod:`pytest_rlparity.numerics`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import sampling
from ..engines.base import Completion, Routes
from ..policy import Policy
from ..settings import SamplingSettings


@dataclass
class Recompute:
    """Per-completion trainer logprobs of the sampled tokens."""

    processed: list[list[float]]
    """Under the processed distribution (what the sampler drew from): the parity target."""
    raw: list[list[float]]
    """Under the model's raw distribution: used to diagnose an engine that returns raw logprobs."""
    alternatives: list[list[dict[int, float]]] | None = None
    """Per position, the trainer's processed logprob of every token the engine reported there."""
    entropy: list[list[float]] | None = None
    """Per position, the entropy (nats) of the processed distribution."""
    twin: Recompute | None = None
    """The same recompute by the trainer's precision twin (the engine's precision), if it has one."""

    @property
    def twin_processed(self) -> list[list[float]] | None:
        """The twin's processed logprobs: the ``twin=`` of a calibrated comparison."""
        return self.twin.processed if self.twin is not None else None


@dataclass
class RoutingReference:
    """The trainer's side of the MoE routing check (:mod:`pytest_rlparity.layers.moe_routing`) on fixed sequences."""

    routes: list[Routes]
    """The fp32 trainer's own routes."""
    twin_routes: list[Routes] | None
    """The precision twin's own routes: how many flips reduced precision alone makes."""
    scores: list[list[float]]
    """Teacher-forced raw logprobs on the trainer's own routes."""
    replayed: list[list[float]]
    """The same with the engine's routes replayed (routing replay)."""
    twin_replayed: list[list[float]] | None
    """The twin's, with the engine's routes replayed: the precision floor of the replayed comparison."""


class Trainer(Policy):
    """The policy as an RL trainer holds it: recompute, one optimizer step, and a precision twin."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        head_dtype: str = "float32",
        device: str = "cpu",
        twin: tuple[str, str] | None = None,
    ) -> None:
        """``twin=(dtype, head_dtype)`` adds a precision twin with those dtypes (see :attr:`twin`)."""
        super().__init__(model_dir, dtype=dtype, head_dtype=head_dtype, device=device)
        self.twin: Trainer | None = None
        """The same policy in the engine's precision; follows this trainer's weights at every use."""
        if twin is not None:
            self.twin = Trainer(model_dir, dtype=twin[0], head_dtype=twin[1], device=device)

    def recompute(
        self, completions: Sequence[Completion], settings: SamplingSettings, *, kv_from: dict[str, torch.Tensor] | None = None
    ) -> Recompute:
        """Trainer logprobs of each completion's sampled tokens, processed and raw, and the twin's.

        With ``kv_from`` (old weights), completions that ran across a weight update are
        recomputed as if their KV from before it had been kept (see :meth:`completion_logits`).
        """
        twin = self._synced_twin()
        by_twin = twin.recompute(completions, settings, kv_from=kv_from) if twin is not None else None
        processed, raw, alternatives, entropy = [], [], [], []
        for c in completions:
            if not c.token_ids:
                processed.append([])
                raw.append([])
                alternatives.append([])
                entropy.append([])
                continue
            # Ids outside the vocabulary are an engine fault the semantic layer reports;
            # clamp them so the recompute runs, and mark their logprobs NaN.
            ids = torch.as_tensor(c.token_ids, device=self.device)
            invalid = (ids < 0) | (ids >= self.vocab_size)
            ids = ids.clamp(0, self.vocab_size - 1)
            split = c.tokens_before_update
            stale = (kv_from, split) if kv_from is not None and split is not None and 0 < split < len(c.token_ids) else None
            logits = self.completion_logits(c.prompt_ids, ids.tolist(), old_kv=stale)
            lp = sampling.processed_logprobs(logits, settings, c.prompt_ids, ids.tolist())
            processed.append(_gather(lp, ids, invalid))
            raw.append(_gather(sampling.raw_logprobs(logits), ids, invalid))
            reported = c.top_logprobs or []
            alternatives.append([{t: float(lp[pos, t]) if 0 <= t < lp.shape[1] else float("nan") for t in step} for pos, step in enumerate(reported)])
            entropy.append(sampling.entropy(lp).tolist())
        return Recompute(processed, raw, alternatives, entropy, by_twin)

    def check_reference(self, sequences: Sequence[Sequence[int]]) -> dict[str, float] | None:
        """Check the reference before it judges: this trainer's and its twin's logits path is the model's own
        forward (:meth:`Policy.check_logits_path`), and the twin's scores of ``sequences`` differ from this
        trainer's only as much as reduced precision can (:func:`~pytest_rlparity.settings.check_floor`).
        Returns that floor (``None`` without a twin); raises ``ReferenceCheckError`` otherwise."""
        from ..compare import precision_floor
        from ..settings import check_floor

        twin = self._synced_twin()
        for policy in (self, twin) if twin is not None else (self,):
            policy.check_logits_path(sequences[0])
        if twin is None:
            return None
        self.check_routing(twin, sequences)
        floor = precision_floor(twin.score(sequences), self.score(sequences))
        check_floor(
            floor,
            f"{self.architecture}: the precision twin ({twin.dtype}, lm_head {twin.head_dtype}) against the fp32 trainer "
            f"on {len(sequences)} fixed sequences",
        )
        return floor

    def routing_reference(self, sequences: Sequence[Sequence[int]], engine_routes: Sequence[Routes]) -> RoutingReference:
        """Routes and scores of ``sequences`` by this trainer and its twin, on their own routes and on the engine's."""
        twin = self._synced_twin()
        return RoutingReference(
            routes=[self.expert_choices(seq) for seq in sequences],
            twin_routes=[twin.expert_choices(seq) for seq in sequences] if twin is not None else None,
            scores=self.score(sequences),
            replayed=self.score_on_routes(sequences, engine_routes),
            twin_replayed=twin.score_on_routes(sequences, engine_routes) if twin is not None else None,
        )

    def check_routing(self, twin: Trainer, sequences: Sequence[Sequence[int]]) -> None:
        """A mixture-of-experts model in reduced precision routes some tokens to other experts than in fp32, and
        each such flip moves their logprobs by nats, not by rounding: no precision floor bounds it. Only the MoE
        routing check (:mod:`~pytest_rlparity.layers.moe_routing`) replays the engine's routes in the trainer;
        the other checks compare on the trainer's own routes. So a reduced-precision MoE reference is refused to
        them (:class:`~pytest_rlparity.errors.RoutingReferenceError`, with the twin's flips and its floor with and
        without the fp32 routes replayed) once the replayed floor itself is sound; an fp32 engine, which routes as
        the trainer does, is judged by all."""
        from ..compare import precision_floor
        from ..errors import RoutingReferenceError
        from ..layers.moe_routing import route_flips
        from ..settings import check_floor

        if not self.routers:
            return
        ours = [self.expert_choices(seq) for seq in sequences]
        flips = route_flips([twin.expert_choices(seq) for seq in sequences], ours)
        full = self.score(sequences)
        own, shared = precision_floor(twin.score(sequences), full), precision_floor(twin.score_on_routes(sequences, ours), full)
        check_floor(shared, f"{self.architecture}: the precision twin ({twin.dtype}) replaying the fp32 trainer's routes")
        worst = max(flips, key=lambda layer: flips[layer][0] / max(flips[layer][1], 1))
        flipped, decisions = sum(f for f, _ in flips.values()), sum(n for _, n in flips.values())
        raise RoutingReferenceError(
            f"{self.architecture} routes each token to experts: its precision twin ({twin.dtype}) picks other experts "
            f"than the fp32 trainer for {flipped} of {decisions} token-layer decisions ({flips[worst][0] / flips[worst][1]:.1%} "
            f"in layer {worst}) on {len(sequences)} fixed sequences, and a flipped route moves a token's logprobs by nats, which no "
            f"precision floor bounds: the twin's floor is max |Δ| {own['max_abs']:.3g}, mean {own['mean_abs']:.3g} on its own "
            f"routes and {shared['max_abs']:.3g}, {shared['mean_abs']:.3g} with the fp32 routes replayed. Only the MoE routing "
            "check (test_moe_routing_matches_trainer, with the engine's routes: vLLM enable_return_routed_experts=True) "
            "replays the engine's routes; the others would compare flipped routes. Run those with an fp32 engine "
            "(--rlparity-engine-kwarg dtype=float32), where engine and trainer route alike"
        )

    def sft_step(self, sequences: Sequence[Sequence[int]], lr: float = 1e-2) -> float:
        """One real optimizer step (AdamW) raising the likelihood of ``sequences``; returns the loss."""
        self.model.train()
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        losses = []
        for seq in sequences:
            ids = self._ids([list(seq)])
            losses.append(self.model(input_ids=ids, labels=ids).loss)
        loss = torch.stack(losses).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return float(loss.detach())

    def score_twin(self, sequences: Sequence[Sequence[int]]) -> list[list[float]] | None:
        """:meth:`score` by the precision twin (``None`` without one): the floor of a calibrated score check."""
        twin = self._synced_twin()
        return twin.score(sequences) if twin is not None else None

    def _synced_twin(self) -> Trainer | None:
        """The precision twin holding this trainer's current weights (and lm_head override), if any."""
        if self.twin is not None:
            self.twin.load_state(self.model.state_dict())
            self.twin._head = self._head
        return self.twin


def _gather(logprobs: torch.Tensor, ids: torch.Tensor, invalid: torch.Tensor) -> list[float]:
    picked = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1)
    return picked.masked_fill(invalid, float("nan")).tolist()
