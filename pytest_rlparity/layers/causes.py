"""Every cause a check can name, defined once: its layer, what to try first, and which of the seed
post's fixes it is.

"The seed post" is the Hugging Face blog post *vLLM V0 to V1: Correctness Before Corrections in
RL* (ServiceNow's PipelineRL), whose fixes this plugin checks for: processed logprobs, no
prefix caching, no async scheduling, the in-flight weight-update path, an fp32 lm_head.

Checks name a :class:`Cause` in their findings; the summary, the report and the advice table
read it from here. A finding with a cause that is not defined here cannot be built.
"""

from __future__ import annotations

from typing import Self

from . import LAYERS

ANY_LAYER = "any"


class Cause(str):
    """One likely culprit of a failed check. It is its name (what the summary shows in brackets and
    the report stores, stable for dashboards), and carries its definition."""

    layer: str
    """The parity layer whose checks name it, or :data:`ANY_LAYER`."""
    advice: str
    """What to try first."""
    seed_fix: str | None
    """The seed post's fix this cause corresponds to, if it is one."""

    def __new__(cls, name: str, layer: str, advice: str, seed_fix: str | None = None) -> Self:
        if layer not in (*LAYERS, ANY_LAYER):
            raise ValueError(f"cause {name!r}: unknown layer {layer!r}")
        cause = super().__new__(cls, name)
        cause.layer, cause.advice, cause.seed_fix = layer, advice, seed_fix
        return cause

    @property
    def name(self) -> str:
        return str(self)



SEMANTIC, PATH, OBJECTIVE = LAYERS

# Semantic: what the logprobs mean.
LOGPROBS_MODE = Cause("logprobs_mode", SEMANTIC, "set the engine kwarg logprobs_mode=processed_logprobs (vLLM >= 0.10 returns raw logprobs by default)", "logprobs_mode=processed_logprobs")
OFF_BY_ONE = Cause("off-by-one", SEMANTIC, "align logprobs with the tokens they score: logprob t belongs to token t, not t+1")
TOP_K_ALTERNATIVES = Cause("top-k alternatives", SEMANTIC, "compare alternatives under the processed distribution (logprobs_mode=processed_logprobs)")
SAMPLED_TOKEN_PRESENT = Cause("sampled token present", SEMANTIC, "report the sampled token's own logprob besides the top-k (vLLM does with logprobs=k)")
PROMPT_LOGPROBS = Cause("prompt logprobs", SEMANTIC, "prompt logprob t must score token t given tokens < t; compare one sequence by hand")
TOKEN_COUNT = Cause("token/logprob count", SEMANTIC, "read one logprob per sampled token, including the final EOS or stop token")
TOKEN_IDS = Cause("token ids round-trip", SEMANTIC, "send prompts as token ids and use the engine's token ids; never re-tokenize decoded text")
JSON_MINUS_INF = Cause("JSON -9999 logprob", SEMANTIC, "read -9999.0 in vLLM's JSON as -inf (probability 0)")
PRECISION = Cause("logprob precision", SEMANTIC, "serialize logprobs at full float precision (no fixed decimals)")
ALTERNATIVES_BY_TEXT = Cause("alternatives keyed by text", SEMANTIC, "ask for alternatives keyed by token id (vLLM's server: return_tokens_as_token_ids=true)")
RERENDERED_HISTORY = Cause("re-rendered history", SEMANTIC, "append earlier turns as the ids the engine sampled; never decode and re-tokenize them or re-apply the chat template to them")
LOSS_MASK = Cause("loss mask", SEMANTIC, "mask exactly the tokens the engine sampled: not prompt or template tokens, not shifted by one")
FINISH = Cause("finish handling", SEMANTIC, "score the EOS/stop token the engine sampled; strip stop strings from text only")
LOGPROB_VALUES = Cause("logprob values", SEMANTIC, "check the trainer's sampling settings, dtype and lm_head precision against the engine's")
BEYOND_FLOOR = Cause("beyond the precision floor", ANY_LAYER, "the model's own bf16 noise does not explain this: compare the engine's kernels, lm_head dtype and weights with an fp32 run")

# Inference path: the same tokens, whatever path the engine takes.
PREFIX_CACHING = Cause("prefix caching", PATH, "try enable_prefix_caching=false; if that fixes it, the cached path computes other numbers", "enable_prefix_caching=False")
STALE_PREFIX_CACHE = Cause("stale prefix cache", PATH, "call reset_prefix_cache() after every weight update (or pause with clear_cache=True)")
SCORING = Cause("scoring", PATH, "teacher-forced prompt logprobs differ from the trainer's: check the weights, dtype and lm_head precision")
CHUNKED_PREFILL = Cause("chunked prefill", PATH, "try enable_chunked_prefill=false or a larger max_num_batched_tokens")
BATCH_INVARIANCE = Cause("batch invariance", PATH, "VLLM_BATCH_INVARIANT=1 promises the same bits on every path: check that the flag reached every engine process (set it before vLLM is imported), then report the path to vLLM")
BATCH_COMPOSITION = Cause("batch composition", PATH, "batch-dependent kernels: try VLLM_BATCH_INVARIANT=1 or a fixed max_num_seqs")
SEEDED_SAMPLING = Cause("seeded sampling", PATH, "pass a per-request seed; check that nothing else consumes the generator")
ASYNC_SCHEDULING = Cause("async_scheduling", PATH, "try async_scheduling=false", "async_scheduling=False")
ENFORCE_EAGER = Cause("enforce_eager", PATH, "try enforce_eager=true; if that fixes it, a compiled kernel or CUDA graph differs")
FP8_BUDGET = Cause("fp8 budget", PATH, "the fp8 path costs more than its budget: check its scales (calibrated k/v scales, calculate_kv_scales), or raise [tolerance] fp8_kv_budget if this cost is accepted")
LM_HEAD = Cause("lm_head precision", PATH, 'compute the lm_head in fp32: hf_overrides={"head_dtype": "float32"}, as the trainer does', "an fp32 lm_head")
MOE_ROUTING = Cause("moe routing", PATH, "the engine routes tokens to other experts than the trainer: check the router weights and their precision; in reduced precision replay the engine's routes in the trainer (vLLM: enable_return_routed_experts=True)")
STALE_WEIGHTS = Cause("stale weights", PATH, "update through the engine's reload path (reload_weights), not by writing named_parameters()")
PARTIAL_UPDATE = Cause("partial update", PATH, "push every tensor, including fused/packed ones (qkv, gate_up), through the reload path, to every rank")
WEIGHTS = Cause("weights", PATH, "check the update path, dtype and lm_head precision")
KV_BEFORE_UPDATE = Cause("KV from before the update", PATH, "pause with clear_cache=True (running requests recompute their KV), or treat those tokens as off-policy", "the in-flight update path (pause, clear_cache)")
PAUSE_ABORT = Cause("pause mode abort", PATH, "treat requests aborted at a pause as unfinished: resubmit prompt + tokens so far after the update")
PAUSE_WAIT = Cause("pause mode wait", PATH, "a 'wait' pause must let running requests finish before the weights change: check the pause call")
PAUSE_KEEP = Cause("pause mode keep", PATH, "give the requests more max_tokens (and ignore_eos) so that they are still running at the pause; over HTTP send the mode in the query string")
DRIFT = Cause("mismatch grows across updates", PATH, "look for state the update path leaves behind from step to step: a prefix cache never reset, a tensor never pushed, KV kept across a pause")
VERSION_LABELS = Cause("weight version labels", PATH, "label new weights (set_weight_version) while paused, after the update and before resuming")

# Objective: the RL loop's health once the layers below are clean.
BACKEND_MISMATCH = Cause("backend mismatch at step 0", OBJECTIVE, "fix the failing semantic / inference-path checks first; then compare dtypes")
MISMATCH_AFTER_UPDATE = Cause("mismatch after a weight update", OBJECTIVE, "check the weight-update path (see the inference-path update checks)")
NO_LEARNING = Cause("no learning", OBJECTIVE, "check the reward and the loss; the engine may sample from stale weights")

# Any layer: the run itself.
GOLDEN = Cause("golden", ANY_LAYER, "if the change is intended, re-record with --rlparity-update-goldens; otherwise diff the goldens")
ENGINE = Cause("engine", ANY_LAYER, "read the engine's error above; check the engine kwargs and that the engine starts alone")

CAUSES: dict[str, Cause] = {c.name: c for c in globals().values() if isinstance(c, Cause)}
"""Every cause by name."""


def for_kwarg(kwarg: str) -> Cause:
    """The cause of a runtime mode switched by one engine kwarg (``async_scheduling``, ``enforce_eager``)."""
    cause = CAUSES.get(kwarg)
    if cause is None or cause.layer != PATH:
        raise ValueError(f"no inference-path cause for the engine kwarg {kwarg!r}")
    return cause
