"""The tiny trainer's recompute: teacher-forced logprobs of the engine's own rollouts.

This is what an RL trainer does before its loss: feed prompt + completion through its
own copy of the policy and read the logprob of each sampled token under the same
*processed* distribution the sampler drew from. The body runs in ``dtype``; the final
projection (lm_head) can run in a wider ``head_dtype``, as MiniMax-M1 and ScaleRL do.

A trainer can carry a *precision twin*: the same weights in the engine's reduced precision.
Its recompute of the same tokens is the model's precision floor, what a bf16 engine is
judged against (:mod:`pytest_rlparity.numerics`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import sampling
from ..engines.base import Completion
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
    floor: Recompute | None = None
    """The same recompute by the trainer's precision twin (the engine's precision), if it has one."""

    @property
    def floor_processed(self) -> list[list[float]] | None:
        """The twin's processed logprobs: the ``floor=`` of a calibrated comparison."""
        return self.floor.processed if self.floor is not None else None


class Trainer:
    """A transformers copy of the policy, as an RL trainer holds it."""

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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.head_dtype = head_dtype
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.vocab_size = int(self.model.config.vocab_size)
        self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        """Whether the lm_head is the input embedding (one tensor here; an engine may hold two)."""
        self._head: torch.Tensor | None = None
        self.twin: Trainer | None = None
        """The same policy in the engine's precision; follows this trainer's weights at every use."""
        if twin is not None:
            self.twin = Trainer(model_dir, dtype=twin[0], head_dtype=twin[1], device=device)

    def logits(self, sequence: Sequence[int], *, grad: bool = False) -> torch.Tensor:
        """float32 next-token logits ``[len(sequence), V]`` for every prefix of ``sequence``."""
        with torch.set_grad_enabled(grad):
            return self._forward(self._ids([list(sequence)]))[0]

    def _ids(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.as_tensor(rows, device=self.device)

    def _forward(self, ids: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
        """float32 logits of ``ids`` (after the KV in ``past``, if any), and the KV cache grown by ``ids``."""
        if self.head_dtype == self.dtype and self._head is None:
            out = self.model(input_ids=ids, past_key_values=past, use_cache=past is not None)
            return out.logits[0].float(), out.past_key_values
        out = self.model.get_decoder()(input_ids=ids, past_key_values=past, use_cache=past is not None)
        head = self.model.get_output_embeddings().weight if self._head is None else self._head
        dtype = getattr(torch, self.head_dtype)
        return torch.nn.functional.linear(out.last_hidden_state[0].to(dtype), head.to(dtype)).float(), out.past_key_values

    def completion_logits(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], *, grad: bool = False, kv_from: tuple[dict[str, torch.Tensor], int] | None = None
    ) -> torch.Tensor:
        """Logits at the positions that predict each completion token: ``[len(token_ids), V]``.

        ``kv_from=(state, k)`` computes them as an engine does for a request that kept its
        KV across a weight update after sampling ``k`` tokens: the KV of the prompt and of
        the first ``k - 1`` tokens comes from ``state`` (the old weights), everything after
        from the current weights.
        """
        full = list(prompt_ids) + list(token_ids)
        start = len(prompt_ids) - 1
        if kv_from is None:
            return self.logits(full[:-1], grad=grad)[start : start + len(token_ids)]
        from transformers import DynamicCache

        old, k = kv_from
        boundary = len(prompt_ids) + k - 1
        ids = self._ids([full[:-1]])
        with torch.no_grad():
            with self.weights(old):
                before, cache = self._forward(ids[:, :boundary], DynamicCache())
            after, _ = self._forward(ids[:, boundary:], cache)
        return torch.cat([before, after])[start : start + len(token_ids)]

    def recompute(
        self, completions: Sequence[Completion], settings: SamplingSettings, *, kv_from: dict[str, torch.Tensor] | None = None
    ) -> Recompute:
        """Trainer logprobs of each completion's sampled tokens, processed and raw, and the twin's.

        With ``kv_from`` (old weights), completions that ran across a weight update are
        recomputed as if their KV from before it had been kept (see :meth:`completion_logits`).
        """
        twin = self._synced_twin()
        floor = twin.recompute(completions, settings, kv_from=kv_from) if twin is not None else None
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
            logits = self.completion_logits(c.prompt_ids, ids.tolist(), kv_from=stale)
            lp = sampling.processed_logprobs(logits, settings, c.prompt_ids, ids.tolist())
            processed.append(_gather(lp, ids, invalid))
            raw.append(_gather(sampling.raw_logprobs(logits), ids, invalid))
            reported = c.top_logprobs or []
            alternatives.append([{t: float(lp[pos, t]) if 0 <= t < lp.shape[1] else float("nan") for t in step} for pos, step in enumerate(reported)])
            entropy.append(sampling.entropy(lp).tolist())
        return Recompute(processed, raw, alternatives, entropy, floor)

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the weights in host memory: a history of versions must not crowd the GPU the engines share."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    @contextlib.contextmanager
    def weights(self, state: dict[str, torch.Tensor]) -> Iterator[Trainer]:
        """Run the block with ``state`` loaded, then put the current weights back."""
        current = self.state()
        self.load_state(state)
        try:
            yield self
        finally:
            self.load_state(current)

    @contextlib.contextmanager
    def head_from(self, state: dict[str, torch.Tensor]) -> Iterator[Trainer]:
        """Run the block with the lm_head of ``state`` and the current body: how an engine computes
        that updated a tied model's embedding and kept its own copy of the head."""
        name = next(n for n, p in self.model.named_parameters() if p is self.model.get_output_embeddings().weight)
        self._head = state[name].to(self.device)
        try:
            yield self
        finally:
            self._head = None

    def save(self, directory: str | os.PathLike[str]) -> str:
        """Write the weights as safetensors, the form vLLM's ``reload_weights`` reads."""
        self.model.save_pretrained(directory, safe_serialization=True)
        return str(directory)

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

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Raw teacher-forced logprobs of tokens ``1..n-1`` of each sequence (engine ``score`` twin)."""
        out = []
        for seq in sequences:
            logits = self.logits(list(seq)[:-1])
            tokens = self._ids([list(seq)[1:]]).T
            out.append(sampling.raw_logprobs(logits).gather(1, tokens).squeeze(1).tolist())
        return out

    def score_floor(self, sequences: Sequence[Sequence[int]]) -> list[list[float]] | None:
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
