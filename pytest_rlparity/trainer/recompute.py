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
from ..engines.base import Completion
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

    def check_routing(self, twin: Trainer, sequences: Sequence[Sequence[int]]) -> None:
        """A mixture-of-experts model in reduced precision routes some tokens to other experts than in fp32, and
        each such flip moves their logprobs by nats, not by rounding: no precision floor bounds it. Judging it
        needs the engine's own routes replayed in the trainer (routing replay), which this suite does not do
        yet; so it refuses with the numbers (the twin's flips, and its floor with and without the fp32 routes
        replayed), and an fp32 engine, which routes as the trainer does, is judged."""
        from ..compare import precision_floor
        from ..errors import ReferenceCheckError

        if not self.routers:
            return
        decisions = flipped = 0
        per_router: dict[str, float] = {}
        replayed = []
        for seq in sequences:
            ours, theirs = self.expert_choices(seq), twin.expert_choices(seq)
            for name, picked in ours.items():
                differ = (picked.sort(dim=-1).values != theirs[name].sort(dim=-1).values).any(dim=-1)
                decisions += differ.numel()
                flipped += int(differ.sum())
                per_router[name] = max(per_router.get(name, 0.0), float(differ.float().mean()))
            with twin.routes_from(ours):
                replayed.append(twin.score([seq])[0])
        full = self.score(sequences)
        own, shared = precision_floor(twin.score(sequences), full), precision_floor(replayed, full)
        worst = max(per_router, key=per_router.__getitem__)
        raise ReferenceCheckError(
            f"{self.architecture} routes each token to experts: its precision twin ({twin.dtype}) picks other experts "
            f"than the fp32 trainer for {flipped} of {decisions} token-router decisions ({per_router[worst]:.1%} in {worst}) "
            f"on {len(sequences)} fixed sequences, and a flipped route moves a token's logprobs by nats, which no "
            f"precision floor bounds: the twin's floor is max |Δ| {own['max_abs']:.3g}, mean {own['mean_abs']:.3g} on its own "
            f"routes and {shared['max_abs']:.3g}, {shared['mean_abs']:.3g} with the fp32 routes replayed. A reduced-precision "
            "mixture-of-experts engine is judged only with the engine's routes replayed in the trainer (routing replay), "
            "which pytest-rlparity does not do yet: run this model with an fp32 engine (--rlparity-engine-kwarg "
            "dtype=float32), where engine and trainer route alike"
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
