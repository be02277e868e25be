"""A transformers reference engine: samples with the shared sampling math, token by token.

It is the V0-like baseline: slow and simple, with no caching, batching or scheduling,
so whatever it reports is the textbook answer. ``logprobs_mode`` mimics vLLM's option,
which lets the semantic checks be exercised without vLLM.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .. import sampling
from ..errors import EngineError, RoutesUnavailable
from ..policy import Policy
from ..settings import SamplingSettings
from .base import Build, Completion, EngineInfo, Routes, StartOptions, checkpoint_tensors, request_seed, skips_on

KWARGS = {"dtype": "float32", "head_dtype": None, "logprobs_mode": "processed_logprobs"}
"""Every kwarg this engine understands, with its default."""


class HFEngine:
    """Greedy or seeded sampling from a transformers model, with vLLM's semantics."""

    name: ClassVar[str] = "hf"
    default_kwargs: ClassVar[dict[str, Any]] = {"dtype": "float32", "logprobs_mode": "processed_logprobs"}
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: str, kwargs: dict[str, Any]) -> None:
        self.validate_kwargs(kwargs)
        options = {**KWARGS, **kwargs}
        self.logprobs_mode = options["logprobs_mode"]
        self.model = Policy(model, dtype=options["dtype"], head_dtype=options["head_dtype"] or options["dtype"])
        self.eos = self.model.tokenizer.eos_token_id
        self.info = EngineInfo(
            name="hf",
            version=f"transformers {importlib.metadata.version('transformers')}",
            device="cpu",
            dtype=options["dtype"],
            kwargs=dict(kwargs),
        )

    @classmethod
    def installed(cls) -> Build:
        return Build(f"transformers {importlib.metadata.version('transformers')}", "cpu")

    @classmethod
    def validate_kwargs(cls, kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(KWARGS))
        if unknown:
            raise EngineError(f"the hf engine does not understand kwargs {unknown}; it knows {sorted(KWARGS)}")
        mode = kwargs.get("logprobs_mode", KWARGS["logprobs_mode"])
        if mode not in ("raw_logprobs", "processed_logprobs"):
            raise EngineError(f"the hf engine supports logprobs_mode raw_logprobs or processed_logprobs, not {mode!r}")

    @classmethod
    def start(cls, model: str, kwargs: dict[str, Any], options: StartOptions | None = None) -> HFEngine:
        return cls(model, kwargs)

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        return [self._one(list(p), settings, request_seed(settings, i)) for i, p in enumerate(prompts)]

    def _one(self, prompt: list[int], settings: SamplingSettings, seed: int | None) -> Completion:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        tokens: list[int] = []
        logprobs: list[float] = []
        top: list[dict[int, float]] = []
        stop_ids = set(settings.stop_token_ids)
        finish, stop_reason = "length", None
        while len(tokens) < settings.max_tokens:
            # Rows for every completion position so penalties see the tokens so far; the
            # placeholder 0 is never read (row t only sees output_ids[:t]).
            logits = self.model.completion_logits(prompt, tokens + [0])
            processed = sampling.process_logits(logits, settings, prompt, tokens + [0])[-1]
            logits = logits[-1:]
            if settings.greedy:
                token = int(processed.argmax())
            else:
                token = int(torch.multinomial(processed.softmax(-1), 1, generator=generator))
            reported = torch.log_softmax(processed if self.logprobs_mode == "processed_logprobs" else logits[0], -1)
            tokens.append(token)
            logprobs.append(float(reported[token]))
            step = {token: float(reported[token])}
            if settings.top_logprobs:
                values, ids = reported.topk(settings.top_logprobs)
                step.update(zip(ids.tolist(), values.tolist()))
            top.append(step)
            if token == self.eos and not settings.ignore_eos:
                finish = "stop"
                break
            if token in stop_ids:
                finish, stop_reason = "stop", token
                break
            text = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
            hit = next((s for s in settings.stop if s in text), None)
            if hit is not None:
                finish, stop_reason = "stop", hit
                break
        skip = tokens[:-1] if isinstance(stop_reason, int) else tokens
        text = self.model.tokenizer.decode(skip, skip_special_tokens=True)
        if isinstance(stop_reason, str):
            text = text[: text.index(stop_reason)]
        return Completion(
            prompt_ids=prompt,
            token_ids=tokens,
            logprobs=logprobs,
            top_logprobs=top,
            text=text,
            finish_reason=finish,
            stop_reason=stop_reason,
            echoed_prompt_ids=prompt,
        )

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        return self.model.score(sequences)

    def expert_routes(self, sequences: Sequence[Sequence[int]]) -> list[Routes]:
        """The routes of its own forward (:class:`~.base.RoutingEngine`); unavailable for a dense model."""
        if not self.model.routers:
            raise RoutesUnavailable(f"{self.model.architecture} has no mixture-of-experts router")
        return [{layer: rows[: len(seq) - 1] for layer, rows in self.model.expert_choices(seq).items()} for seq in sequences]

    def update_weights(self, directory: str, *, method: str = "reload_dir", skip_prefixes: Sequence[str] = ()) -> None:
        """Load the weights in ``directory``, leaving out tensors under ``skip_prefixes``."""
        if method not in ("reload_dir", "reload_tensors"):
            raise EngineError(f"the hf engine updates weights with reload_dir or reload_tensors, not {method!r}")
        state = self.model.state()
        for name, tensor in checkpoint_tensors(directory, skips_on(0, skip_prefixes)):
            if name in state:
                state[name] = tensor
        self.model.load_state(state)

    def reset_prefix_cache(self) -> None:
        """Nothing is cached."""

    def close(self) -> None:
        pass
