"""The sampler's math, in vLLM's order, shared by the trainer, the reference engine and the checks.

vLLM V1 (``vllm/v1/sample/sampler.py``) turns raw logits into the distribution it
samples from in this order:

1. logits in float32;
2. penalties: repetition (prompt and output tokens; positive logits divided, negative
   multiplied), then frequency (times output count), then presence (output tokens);
3. greedy requests stop here: their processed logprobs are ``log_softmax`` of (2);
4. temperature;
5. min-p (on the tempered probabilities, relative to the most likely token);
6. top-k (ties with the k-th value are kept), then top-p (ascending cumulative mass
   ``<= 1 - p`` is dropped; the most likely token always stays).

``processed_logprobs`` is ``log_softmax`` of the result; ``raw_logprobs`` is
``log_softmax`` of (1). Keeping both here, in one place, is what lets a check say
"the engine returned raw logprobs" instead of "numbers differ".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .settings import SamplingSettings


def process_logits(
    logits: torch.Tensor,
    settings: SamplingSettings,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Apply ``settings`` to teacher-forced ``logits`` of shape ``[T, V]``.

    Row ``t`` predicts output token ``t``; penalties at row ``t`` see ``output_ids[:t]``
    as already generated, exactly as the engine saw them while sampling.
    Returns new float32 logits with filtered tokens at ``-inf``.
    """
    logits = logits.to(torch.float32).clone()
    if settings.has_penalties:
        logits = apply_penalties(logits, settings, prompt_ids, output_ids)
    if settings.greedy:
        return logits
    logits = logits / settings.temperature
    if settings.min_p > 0.0:
        logits = apply_min_p(logits, settings.min_p)
    if 0 < settings.top_k < logits.shape[-1]:
        logits = apply_top_k(logits, settings.top_k)
    if settings.top_p < 1.0:
        logits = apply_top_p(logits, settings.top_p)
    return logits


def processed_logprobs(
    logits: torch.Tensor,
    settings: SamplingSettings,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Log-probabilities of the distribution the sampler draws from (vLLM's ``processed_logprobs``)."""
    return torch.log_softmax(process_logits(logits, settings, prompt_ids, output_ids), dim=-1)


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the model's own distribution (vLLM's default ``raw_logprobs``)."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def output_counts(output_ids: Sequence[int], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[T, V]`` counts of each token among ``output_ids[:t]``, i.e. before position ``t``."""
    steps = len(output_ids)
    counts = torch.zeros(steps, vocab_size, dtype=torch.float32, device=device)
    if steps > 1:
        onehot = torch.nn.functional.one_hot(torch.as_tensor(output_ids[:-1], device=device), vocab_size).float()
        counts[1:] = torch.cumsum(onehot, dim=0)
    return counts


def apply_penalties(
    logits: torch.Tensor,
    settings: SamplingSettings,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
) -> torch.Tensor:
    steps, vocab = logits.shape
    if len(output_ids) < steps:
        raise ValueError(f"penalties need the {steps} output tokens the rows predict, got {len(output_ids)}")
    counts = output_counts(output_ids[:steps], vocab, logits.device)
    seen = counts > 0
    if settings.repetition_penalty != 1.0:
        in_prompt = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        if len(prompt_ids):
            in_prompt[torch.as_tensor(list(prompt_ids), device=logits.device)] = True
        penalty = torch.where(seen | in_prompt, settings.repetition_penalty, 1.0)
        logits = logits * torch.where(logits > 0, 1.0 / penalty, penalty)
    logits = logits - settings.frequency_penalty * counts
    return logits - settings.presence_penalty * seen.float()


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    ordered, order = logits.sort(dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p
    drop[..., -1] = False
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` per row; ``-inf`` logits contribute nothing."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)
