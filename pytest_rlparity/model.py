"""The embedded default model: a tiny Llama and tokenizer made on the spot, and fingerprints.

Nothing is downloaded. The model is generated from a seed, cached on disk, and
identified by a fingerprint (a hash of config, weights and tokenizer) that every
golden records, so a golden never gets compared against a different model by accident.
Any local Hugging Face model directory can replace it; it is fingerprinted the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

GENERATOR_VERSION = 1
"""Bump when the generated model changes, so stale caches are not reused."""

DEFAULT_SEED = 0

CORPUS = (
    "The engine samples a token and reports its log probability.",
    "The trainer recomputes the same log probability with teacher forcing.",
    "A policy ratio near one means the rollout and the trainer agree.",
    "Temperature, top k, top p and min p reshape the distribution before sampling.",
    "Penalties for repetition, presence and frequency change the logits first.",
    "A cached prefix can hold keys and values from before a weight update.",
    "Correctness before corrections: check the backend before the objective.",
    "Numbers one two three four five six seven eight nine ten.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Small models learn fast, and tiny models are faster still.",
)
"""Text the byte-level BPE is trained on; also the source of the built-in prompts."""

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 352
HIDDEN = 128
HEADS = 2  # head_dim 64: vLLM's CPU attention refuses head_dim 16.
LAYERS = 2
INTERMEDIATE = 256
INIT_STD = 0.15
"""Larger than usual so the distribution is peaked, like a trained model's, not near-uniform."""
MAX_POSITIONS = 1024

LARGE_LOGITS = "large-logits"
"""A variant with a large constant channel in the residual stream (the "massive activations" of
trained LLMs) that the lm_head turns into a logit offset of about 90 shared by every token.
Log-softmax ignores a shared offset, but a bf16 lm_head rounds logits of that size to steps of
0.5, so the head's precision shows (bf16 head: mean |Δlogprob| ~0.12 vs fp32 ~0.012 here)."""
LARGE_LOGITS_CHANNEL = (16.0, 32.0)
"""(embedding value, lm_head weight) of channel 0 in the large-logits variant."""

FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def cache_root() -> Path:
    """Where generated models live: ``$RLPARITY_CACHE_DIR`` or the user's cache directory."""
    explicit = os.environ.get("RLPARITY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-rlparity"


def embedded_model(seed: int = DEFAULT_SEED, root: Path | None = None, variant: str = "") -> Path:
    """Return the directory of the tiny model for ``seed`` (and ``variant``), generating it once.

    Generation happens in a temporary sibling directory that is renamed into place, under a
    lock file: concurrent pytest-xdist workers (or pytest runs) wait for the first to finish
    and use its copy; nobody replaces a finished model another process may be loading.
    """
    root = root or cache_root()
    if variant not in ("", LARGE_LOGITS):
        raise ValueError(f"unknown embedded model variant {variant!r}; known: {LARGE_LOGITS!r}")
    target = root / (f"tiny-llama-g{GENERATOR_VERSION}-seed{seed}" + (f"-{variant}" if variant else ""))
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with (root / (target.name + ".lock")).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target):  # another process made it while this one waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
        try:
            _generate(staging, seed, variant)
            (staging / ".rlparity-complete").write_text(fingerprint(staging) + "\n")
            if target.exists():
                shutil.rmtree(target)  # an interrupted or corrupt entry; only generators (holding the lock) write here
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(target: Path) -> bool:
    marker = target / ".rlparity-complete"
    try:
        return marker.is_file() and marker.read_text().strip() == fingerprint(target)
    except (OSError, ValueError):
        return False


def _generate(directory: Path, seed: int, variant: str = "") -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
        # EOS shares the output row of "." so generations end now and then and the
        # EOS path is exercised; a random row would almost never be sampled.
        period = tokenizer.convert_tokens_to_ids(".")
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[period]
        if variant == LARGE_LOGITS:
            model.model.embed_tokens.weight[:, 0] = LARGE_LOGITS_CHANNEL[0]
            model.lm_head.weight[:, 0] = LARGE_LOGITS_CHANNEL[1]
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def tokens_of_length(tokenizer: Any, count: int) -> list[int]:
    """``count`` token ids of the corpus under ``tokenizer``, repeating it as needed, after BOS if the
    tokenizer adds one: prompts sized in the model's own tokens, whatever its vocabulary."""
    text = " ".join(CORPUS)
    ids: list[int] = tokenizer(text).input_ids
    while len(ids) < count:
        ids += tokenizer(" " + text, add_special_tokens=False).input_ids
    return ids[:count]


def corpus_prompts(tokenizer: Any) -> list[list[int]]:
    """The built-in prompts as token ids: the first four words of each sentence of :data:`CORPUS`."""
    return [tokenizer(" ".join(s.split()[:4])).input_ids for s in CORPUS]


def non_canonical_prompts(tokenizer: Any, count: int = 4) -> list[list[int]]:
    """Prompts whose token ids the tokenizer would not produce from their own text: words of the corpus
    spelled one character token at a time. An engine that re-tokenizes the decoded text sees other ids."""
    prompts = []
    for sentence in CORPUS:
        words = sentence.split()[:4]
        ids = tokenizer(words[0]).input_ids
        for word in words[1:]:
            for char in " " + word:
                ids += tokenizer(char, add_special_tokens=False).input_ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if tokenizer(text).input_ids != ids:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """A stable hash of a model directory's config, tokenizer and weights.

    JSON files are hashed in canonical form without ``transformers_version``, and
    safetensors by tensor name, dtype, shape and bytes, so re-saving with a newer
    library does not change the fingerprint while any change of weights does.
    Reads no code and imports nothing heavy.
    """
    directory = Path(model_dir)
    weights = check_model_dir(directory)
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data.pop("transformers_version", None)
            digest.update(name.encode() + b"\0" + json.dumps(data, sort_keys=True).encode())
    for path in weights:
        _hash_safetensors(path, digest)
    return "sha256:" + digest.hexdigest()[:16]


def check_model_dir(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, after checking what the engines and the trainer
    need (config.json, readable safetensors headers); a :class:`ValueError` says what is missing."""
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} is not a local Hugging Face model directory (no config.json)")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        other = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        found = f" (it has {', '.join(other[:3])})" if other else ""
        raise ValueError(
            f"{directory} has no *.safetensors weights{found}. pytest-rlparity reads only safetensors (loading "
            "them runs no code); convert with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR, safe_serialization=True)"
        )
    for path in weights:
        try:
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc}); re-download or re-save the model") from None
    return weights


def _hash_safetensors(path: Path, digest: hashlib._Hash) -> None:
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        start = 8 + header_len
        for name in sorted(k for k in header if k != "__metadata__"):
            meta = header[name]
            begin, end = meta["data_offsets"]
            digest.update(f"{name}:{meta['dtype']}:{meta['shape']}".encode())
            f.seek(start + begin)
            remaining = end - begin
            while remaining:
                chunk = f.read(min(remaining, 1 << 24))
                if not chunk:
                    raise ValueError(f"{path} is truncated: tensor {name} runs past the end of the file")
                digest.update(chunk)
                remaining -= len(chunk)
