"""The tiny trainer's recompute: teacher-forced logprobs of the engine's own rollouts.

This is what an RL trainer does before its loss: feed prompt + completion through its
own copy of the policy and read the logprob of each sampled token under the same
*processed* distribution the sampler drew from. The body runs in ``dtype``; the final
projection (lm_head) can run in a wider ``head_dtype``, as MiniMax-M1 and ScaleRL do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


class Trainer:
    """A transformers copy of the policy, as an RL trainer holds it."""

    def __init__(self, model_dir: str | os.PathLike[str], *, dtype: str = "float32", head_dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.head_dtype = head_dtype
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.vocab_size = int(self.model.config.vocab_size)

    def logits(self, sequence: Sequence[int], *, grad: bool = False) -> torch.Tensor:
        """float32 next-token logits ``[len(sequence), V]`` for every prefix of ``sequence``."""
        with torch.set_grad_enabled(grad):
            return self._logits(torch.as_tensor([list(sequence)]))

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.head_dtype == self.dtype:
            return self.model(input_ids=ids).logits[0].float()
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0]
        head = self.model.get_output_embeddings().weight
        return torch.nn.functional.linear(hidden.to(getattr(torch, self.head_dtype)), head.to(getattr(torch, self.head_dtype))).float()

    def completion_logits(self, prompt_ids: Sequence[int], token_ids: Sequence[int], *, grad: bool = False) -> torch.Tensor:
        """Logits at the positions that predict each completion token: ``[len(token_ids), V]``."""
        full = list(prompt_ids) + list(token_ids)
        start = len(prompt_ids) - 1
        return self.logits(full[:-1], grad=grad)[start : start + len(token_ids)]

    def recompute(self, completions: Sequence[Completion], settings: SamplingSettings) -> Recompute:
        """Trainer logprobs of each completion's sampled tokens, processed and raw."""
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
            ids = torch.as_tensor(c.token_ids)
            invalid = (ids < 0) | (ids >= self.vocab_size)
            ids = ids.clamp(0, self.vocab_size - 1)
            logits = self.completion_logits(c.prompt_ids, ids.tolist())
            lp = sampling.processed_logprobs(logits, settings, c.prompt_ids, ids.tolist())
            processed.append(_gather(lp, ids, invalid))
            raw.append(_gather(sampling.raw_logprobs(logits), ids, invalid))
            reported = c.top_logprobs or []
            alternatives.append([{t: float(lp[pos, t]) if 0 <= t < lp.shape[1] else float("nan") for t in step} for pos, step in enumerate(reported)])
            entropy.append(sampling.entropy(lp).tolist())
        return Recompute(processed, raw, alternatives, entropy)

    def state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the weights (the tiny model makes this cheap)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

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
            ids = torch.as_tensor([list(seq)])
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
            tokens = torch.as_tensor(list(seq)[1:]).unsqueeze(1)
            out.append(sampling.raw_logprobs(logits).gather(1, tokens).squeeze(1).tolist())
        return out


def _gather(logprobs: torch.Tensor, ids: torch.Tensor, invalid: torch.Tensor) -> list[float]:
    picked = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1)
    return picked.masked_fill(invalid, float("nan")).tolist()
