"""The policy's forward pass, shared by the trainer and the transformers engine.

A transformers model whose body runs in ``dtype`` and whose final projection (lm_head) can run
in a wider ``head_dtype``, as MiniMax-M1 and ScaleRL do; teacher-forced logits, including the
logits of a request that kept its KV across a weight update; and its weights as state.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import sampling

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


class Policy:
    """A transformers copy of the policy: its forward pass and its weights."""

    def __init__(self, model_dir: str | os.PathLike[str], *, dtype: str = "float32", head_dtype: str = "float32", device: str = "cpu") -> None:
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

    def logits(self, sequence: Sequence[int]) -> torch.Tensor:
        """float32 next-token logits ``[len(sequence), V]`` for every prefix of ``sequence`` (no gradient: the
        optimizer step's forward is :meth:`completions_logits`)."""
        with torch.no_grad():
            return self._forward(self._ids([list(sequence)]))[0][0]

    def _ids(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.as_tensor(rows, device=self.device)

    def _forward(self, ids: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
        """float32 logits ``[rows, len, V]`` of ``ids`` (after the KV in ``past``, if any), and the KV cache grown by ``ids``.

        Always the model's own forward, so whatever it does after the head (Gemma2's soft-cap, Granite's
        and Cohere's logit scale) or before it (MiniCPM3's hidden scaling) is applied; only the head's
        matmul runs in ``head_dtype`` (:meth:`_head_in`)."""
        with self._head_in(self.head_dtype, self._head):
            out = self.model(input_ids=ids, past_key_values=past, use_cache=past is not None)
        return out.logits.float(), out.past_key_values

    @contextlib.contextmanager
    def _head_in(self, head_dtype: str, weight: torch.Tensor | None = None) -> Iterator[None]:
        """Within the block the lm_head computes in ``head_dtype`` (with ``weight`` instead of its own, if
        given), as vLLM's ``hf_overrides={"head_dtype": ...}`` does; nothing changes where that is a no-op."""
        if head_dtype == self.dtype and weight is None:
            yield
            return
        head = self.model.get_output_embeddings()
        dtype = getattr(torch, head_dtype)
        w = head.weight if weight is None else weight
        bias = getattr(head, "bias", None)

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(hidden.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))

        head.forward = forward  # an instance attribute shadows the class's forward for this block only
        try:
            yield
        finally:
            del head.forward

    def check_logits_path(self, sequence: Sequence[int]) -> None:
        """Raise :class:`~pytest_rlparity.errors.ReferenceCheckError` unless the path every recompute
        takes gives ``model()``'s own logits bit for bit on ``sequence``.

        The head swap of :meth:`_head_in` is forced on at this policy's own dtype, where it must change
        nothing: a path that skipped what the architecture does around its head would differ here."""
        from .errors import ReferenceCheckError

        with torch.no_grad():
            plain = self.model(input_ids=self._ids([list(sequence)])).logits[0].float()
            saved, self._head = self._head, self.model.get_output_embeddings().weight
            dtype, self.head_dtype = self.head_dtype, self.dtype
            try:
                path = self.logits(sequence)
            finally:
                self._head, self.head_dtype = saved, dtype
        if not torch.equal(plain, path):
            raise ReferenceCheckError(
                f"{self.architecture}: the trainer's logits path (the model's forward with its lm_head computed in a "
                f"chosen dtype) differs from the model's own forward at the same precision by up to "
                f"{float((plain - path).abs().max()):.3g}: the precision twin and any fp32-head trainer of this "
                "architecture would be wrong. Run the suite with an fp32 engine and trainer, or report the architecture."
            )

    @property
    def routers(self) -> dict[int, torch.nn.Module]:
        """The mixture-of-experts routers of the model by decoder-layer index: modules with a ``top_k`` that
        return ``(logits, weights, expert indices)`` (Qwen3-MoE, Mixtral, OLMoE, ... in transformers); empty
        for a dense model. Keyed by layer, as engines report their routes (:data:`~.engines.base.Routes`)."""
        return {
            int(match.group(1)): m
            for name, m in self.model.named_modules()
            if hasattr(m, "top_k") and name.endswith("gate") and (match := _LAYER_INDEX.search(name))
        }

    def expert_choices(self, sequence: Sequence[int]) -> dict[int, torch.Tensor]:
        """Per MoE layer, the experts its router picks for each token of ``sequence`` (``[len, top_k]``, in its own order)."""
        picked: dict[int, torch.Tensor] = {}
        hooks = [
            module.register_forward_hook(lambda _m, _i, out, layer=layer: picked.__setitem__(layer, out[-1].cpu()))
            for layer, module in self.routers.items()
        ]
        try:
            with torch.no_grad():
                self._forward(self._ids([list(sequence)]))
        finally:
            for hook in hooks:
                hook.remove()
        return picked

    @contextlib.contextmanager
    def routes_from(self, choices: dict[int, torch.Tensor]) -> Iterator[None]:
        """Within the block every router picks the experts in ``choices`` (per layer, ``[tokens, top_k]``, as
        :meth:`expert_choices` gives them or an engine reports them for the same sequence) instead of its own,
        weighted by its own probabilities of them: routing replay, as RL stacks force the trainer onto the
        engine's routes. A router whose layer is missing from ``choices`` routes as its own."""

        def replay(module: torch.nn.Module, _inputs: Any, out: Any, layer: int) -> Any:
            logits = out[0]
            picked = choices[layer][: logits.shape[0]].to(device=logits.device, dtype=torch.long)  # a prefix routes as in the whole sequence
            weights = torch.softmax(logits.float(), dim=-1).gather(-1, picked)
            if getattr(module, "norm_topk_prob", False):
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return (logits, weights.to(out[1].dtype), picked)

        hooks = [
            module.register_forward_hook(lambda m, i, o, layer=layer: replay(m, i, o, layer))
            for layer, module in self.routers.items()
            if layer in choices
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def score_on_routes(self, sequences: Sequence[Sequence[int]], routes: Sequence[dict[int, torch.Tensor]]) -> list[list[float]]:
        """:meth:`score` of each sequence with its ``routes`` replayed (:meth:`routes_from`)."""
        scores = []
        for seq, choices in zip(sequences, routes, strict=True):
            with self.routes_from(choices):
                scores.append(self.score([seq])[0])
        return scores

    @property
    def architecture(self) -> str:
        return ", ".join(getattr(self.model.config, "architectures", None) or [type(self.model).__name__])

    def completion_logits(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], *, old_kv: tuple[dict[str, torch.Tensor], int] | None = None
    ) -> torch.Tensor:
        """Logits at the positions that predict each completion token: ``[len(token_ids), V]``.

        ``old_kv=(state, k)`` computes them as an engine does for a request that kept its
        KV across a weight update after sampling ``k`` tokens: the KV of the prompt and of
        the first ``k - 1`` tokens comes from ``state`` (the old weights), everything after
        from the current weights.
        """
        full = list(prompt_ids) + list(token_ids)
        start = len(prompt_ids) - 1
        if old_kv is None:
            return self.logits(full[:-1])[start : start + len(token_ids)]
        from transformers import DynamicCache

        old, k = old_kv
        boundary = len(prompt_ids) + k - 1
        ids = self._ids([full[:-1]])
        with torch.no_grad():
            with self.weights(old):
                before, cache = self._forward(ids[:, :boundary], DynamicCache())
            after, _ = self._forward(ids[:, boundary:], cache)
        return torch.cat([before[0], after[0]])[start : start + len(token_ids)]

    def completions_logits(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, grad: bool = False) -> list[torch.Tensor]:
        """:meth:`completion_logits` of each ``(prompt_ids, token_ids)`` pair, in one forward of the rows padded
        on the right: causal attention keeps the padding out of every real position, so only rounding differs
        from one forward per pair. For the optimizer step, one forward a batch as trainers run it; recomputes,
        the reference, take one pair at a time (:meth:`completion_logits`), the path :meth:`check_logits_path` checks."""
        rows = [(list(p) + list(t))[:-1] for p, t in pairs]
        width = max(map(len, rows))
        ids = self._ids([row + [0] * (width - len(row)) for row in rows])
        with torch.set_grad_enabled(grad):
            logits = self._forward(ids)[0]
        return [logits[i, len(p) - 1 : len(p) - 1 + len(t)] for i, (p, t) in enumerate(pairs)]

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the weights in host memory: a history of versions must not crowd the GPU the engines share."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    @contextlib.contextmanager
    def weights(self, state: dict[str, torch.Tensor]) -> Iterator[Policy]:
        """Run the block with ``state`` loaded, then put the current weights back."""
        current = self.state()
        self.load_state(state)
        try:
            yield self
        finally:
            self.load_state(current)

    @contextlib.contextmanager
    def head_from(self, state: dict[str, torch.Tensor]) -> Iterator[Policy]:
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

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Raw teacher-forced logprobs of tokens ``1..n-1`` of each sequence (engine ``score`` twin)."""
        out = []
        for seq in sequences:
            logits = self.logits(list(seq)[:-1])
            tokens = self._ids([list(seq)[1:]]).T
            out.append(sampling.raw_logprobs(logits).gather(1, tokens).squeeze(1).tolist())
        return out
