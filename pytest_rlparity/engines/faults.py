"""Fault injection: wrap a real engine so that it makes one known mistake.

A parity check is only worth having if it fails on the fault it exists to catch. Wrap
the engine under test, run the check, and assert that it fails and names the fault::

    from pytest_rlparity.engines.faults import FaultyEngine

    broken = FaultyEngine(rlparity_engine, shift_logprobs=1)
    with pytest.raises(ParityError, match="off-by-one"):
        ...  # the same check as in the clean test

Each fault mimics a real bug seen in RL stacks (see the field names).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..settings import SamplingSettings
from .base import Completion, Engine


@dataclasses.dataclass
class FaultyEngine:
    """An engine that forwards to ``inner`` and corrupts its results in one named way."""

    inner: Engine
    shift_logprobs: int = 0
    """Pair token ``t`` with the logprob of token ``t + shift`` (an off-by-one in output parsing)."""
    drop_sampled_from_top: bool = False
    """Remove the sampled token from the reported top-k dict (top-k read instead of the sampled logprob)."""
    logprob_offset: float = 0.0
    """Add a constant to every logprob (a forgotten temperature or normaliser)."""
    retokenize_text: bool = False
    """Report text that does not decode from the token ids (text re-tokenized or post-processed)."""
    drop_last_logprob: bool = False
    """One logprob fewer than tokens (the final token's logprob lost when a stream is cut)."""
    batch_drift: float = 0.0
    """Shift every logprob by this much per other request in the batch (batch-variant kernels)."""
    unseeded: bool = False
    """Ignore the request seeds (a generator shared across requests): one seed, other rollouts."""
    cache_drift: float | None = None
    """Serve repeated prompts as prefix-cache hits (``cached_tokens``), their logprobs shifted by this
    much (a cached path that computes other numbers); ``None``: no cache."""
    chunk: int | None = None
    """Report chunked prefill with this token budget (:meth:`prefill_chunk`)."""
    chunk_drift: float = 0.0
    """Shift scores past the first ``chunk`` positions (a chunk boundary that loses state)."""
    _seen: set[tuple[int, ...]] = dataclasses.field(default_factory=set, repr=False)

    @property
    def info(self):
        return self.inner.info

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        if self.unseeded:
            settings = dataclasses.replace(settings, seed=None)
        drift = self.batch_drift * (len(prompts) - 1)
        completions = []
        for c in self.inner.generate(prompts, settings):
            c = self._corrupt(c)
            shift = drift
            if self.cache_drift is not None:
                if tuple(c.prompt_ids) in self._seen:
                    c = dataclasses.replace(c, cached_tokens=len(c.prompt_ids) - 1)
                    shift += self.cache_drift
                self._seen.add(tuple(c.prompt_ids))
            completions.append(dataclasses.replace(c, logprobs=[lp + shift for lp in c.logprobs]) if shift else c)
        return completions

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        drift = self.batch_drift * (len(sequences) - 1)
        cut = self.chunk or 0
        return [
            [lp + drift + (self.chunk_drift if pos + 1 >= cut else 0.0) for pos, lp in enumerate(scores)]
            for scores in self.inner.score(sequences)
        ]

    def prefill_chunk(self) -> int | None:
        return self.chunk

    def reset_prefix_cache(self) -> None:
        self._seen.clear()
        self.inner.reset_prefix_cache()  # type: ignore[attr-defined]

    def close(self) -> None:
        """The wrapped engine belongs to its owner; closing the wrapper leaves it running."""

    def _corrupt(self, c: Completion) -> Completion:
        logprobs = [lp + self.logprob_offset for lp in c.logprobs]
        top = [dict(step) for step in c.top_logprobs] if c.top_logprobs is not None else None
        if self.shift_logprobs and len(logprobs) > abs(self.shift_logprobs):
            s = self.shift_logprobs
            logprobs = logprobs[s:] + logprobs[:s]
        if self.drop_sampled_from_top and top is not None:
            for tok, step in zip(c.token_ids, top):
                step.pop(tok, None)
        if self.drop_last_logprob:
            logprobs = logprobs[:-1]
        text = c.text + " [edited]" if self.retokenize_text else c.text
        return dataclasses.replace(c, logprobs=logprobs, top_logprobs=top, text=text)


ROUTER_WEIGHT = re.compile(r"\.gate\.weight$")
"""A mixture-of-experts router's weight (``model.layers.N.mlp.gate.weight``), not a gated MLP's ``gate_proj``."""


def perturbed_router(model_dir: str | Path, dest: str | Path, *, scale: float, seed: int = 0) -> Path:
    """Copy the model in ``model_dir`` to ``dest`` with noise of ``scale`` times each router weight's std added:
    start an engine on the copy and judge it against the trainer on the original. Mimics an engine whose router
    computes otherwise (a router left in another precision or missed by a weight update). Raises if the model
    has no router."""
    import torch
    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    shutil.copytree(model_dir, dest)
    generator = torch.Generator().manual_seed(seed)
    perturbed = 0
    for path in sorted(dest.glob("*.safetensors")):
        tensors = load_file(path)
        for name in sorted(tensors):
            if ROUTER_WEIGHT.search(name):
                weight = tensors[name]
                noise = torch.randn(weight.shape, generator=generator) * float(weight.float().std()) * scale
                tensors[name] = (weight.float() + noise).to(weight.dtype)
                perturbed += 1
        save_file(tensors, path, metadata={"format": "pt"})
    if not perturbed:
        shutil.rmtree(dest)
        raise ValueError(f"{model_dir} has no mixture-of-experts router weight (*.gate.weight) to perturb")
    return dest
