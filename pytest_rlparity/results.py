"""What each parity test measured, collected while it runs, and the run's JSON report.

Checks publish their outcome (verdict, statistics, tolerance, findings, golden
provenance) with :func:`publish`; during a test the plugin collects them with
:func:`collecting` and attaches them to the test's report, so they survive pytest-xdist.
Outside a test nothing collects and :func:`publish` does nothing, so the layer functions
stay usable on their own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from . import frameworks

if TYPE_CHECKING:
    from .compare import Comparison

REPORT_FORMAT = "pytest-rlparity-report/1"
PROPERTY = "rlparity_checks"
"""The key under which a test's checks travel in ``report.user_properties``."""

ADVICE: dict[str, str] = {
    "logprobs_mode": "set the engine kwarg logprobs_mode=processed_logprobs (vLLM >= 0.10 returns raw logprobs by default)",
    "off-by-one": "align logprobs with the tokens they score: logprob t belongs to token t, not t+1",
    "top-k alternatives": "compare alternatives under the processed distribution (logprobs_mode=processed_logprobs)",
    "sampled token present": "report the sampled token's own logprob besides the top-k (vLLM does with logprobs=k)",
    "prompt logprobs": "prompt logprob t must score token t given tokens < t; compare one sequence by hand",
    "token/logprob count": "read one logprob per sampled token, including the final EOS or stop token",
    "token ids round-trip": "send prompts as token ids and use the engine's token ids; never re-tokenize decoded text",
    "JSON logprob floor": "read -9999.0 in vLLM's JSON as -inf (probability 0)",
    "logprob precision": "serialize logprobs at full float precision (no fixed decimals)",
    "alternatives keyed by text": "ask for alternatives keyed by token id (vLLM's server: return_tokens_as_token_ids=true)",
    "finish handling": "score the EOS/stop token the engine sampled; strip stop strings from text only",
    "logprob values": "check the trainer's sampling settings, dtype and lm_head precision against the engine's",
    "beyond the precision floor": "the model's own bf16 noise does not explain this: compare the engine's kernels, lm_head dtype and weights with an fp32 run",
    "prefix caching": "try enable_prefix_caching=false; if that fixes it, the cached path computes other numbers",
    "stale prefix cache": "call reset_prefix_cache() after every weight update (or pause with clear_cache=True)",
    "scoring": "teacher-forced prompt logprobs differ from the trainer's: check the weights, dtype and lm_head precision",
    "chunked prefill": "try enable_chunked_prefill=false or a larger max_num_batched_tokens",
    "batch composition": "batch-dependent kernels: try VLLM_BATCH_INVARIANT=1 or a fixed max_num_seqs",
    "seeded sampling": "pass a per-request seed; check that nothing else consumes the generator",
    "async_scheduling": "try async_scheduling=false (the seed post's fix on V1)",
    "enforce_eager": "try enforce_eager=true; if that fixes it, a compiled kernel or CUDA graph differs",
    "lm_head precision": 'compute the lm_head in fp32: hf_overrides={"head_dtype": "float32"}, as the trainer does',
    "stale weights": "update through the engine's reload path (reload_weights), not by writing named_parameters()",
    "partial update": "push every tensor, including fused/packed ones (qkv, gate_up), through the reload path",
    "weights": "check the update path, dtype and lm_head precision",
    "KV from before the update": "pause with clear_cache=True (running requests recompute their KV), or treat those tokens as off-policy",
    "pause mode abort": "treat requests aborted at a pause as unfinished: resubmit prompt + tokens so far after the update",
    "pause mode wait": "a 'wait' pause must let running requests finish before the weights change: check the pause call",
    "pause mode keep": "give the requests more max_tokens (and ignore_eos) so that they are still running at the pause",
    "weight version labels": "label new weights (set_weight_version) while paused, after the update and before resuming",
    "backend mismatch at step 0": "fix the failing semantic / inference-path checks first; then compare dtypes",
    "mismatch after a weight update": "check the weight-update path (see the inference-path update checks)",
    "no learning": "check the reward and the loss; the engine may sample from stale weights",
    "golden": "if the change is intended, re-record with --rlparity-update-goldens; otherwise diff the goldens",
    "engine": "read the engine's error above; check the engine kwargs and that the engine starts alone",
}
"""What to try first, per cause; the seed post's fixes come first where they apply."""

Sink = Callable[[dict[str, Any], "Comparison | None"], None]
_sink: ContextVar[Sink | None] = ContextVar("rlparity_sink", default=None)


def advice_for(cause: str | None) -> str | None:
    if not cause:
        return None
    return ADVICE.get(cause) or next((text for key, text in ADVICE.items() if key in cause), None)


def publish(entry: dict[str, Any], comparison: Comparison | None = None) -> None:
    """Hand one check's outcome to the running test's collector, if any."""
    sink = _sink.get()
    if sink is not None:
        sink(entry, comparison)


@contextlib.contextmanager
def collecting(sink: Sink) -> Iterator[None]:
    """Route :func:`publish` calls of the code running inside to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def jsonable(value: Any) -> Any:
    """Floats that JSON can hold (inf/nan as strings), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def build_report(run: dict[str, Any], outcomes: list[Any], layers: tuple[str, ...]) -> dict[str, Any]:
    """The machine-readable report: the run, a verdict per layer, and every test with its checks."""
    layer_rows = {}
    failed_below: list[str] = []
    tests = []
    for layer in (*layers, "custom"):
        mine = [o for o in outcomes if o.layer == layer]
        if not mine:
            continue
        counts = {k: sum(o.outcome == k for o in mine) for k in ("passed", "failed", "skipped")}
        layer_rows[layer] = {"verdict": "failed" if counts["failed"] else "ok", **counts}
        for o in mine:
            tests.append(
                {
                    "nodeid": o.nodeid,
                    "layer": o.layer,
                    "outcome": o.outcome,
                    "duration_s": round(o.duration, 3),
                    "cause": o.cause,
                    "advice": advice_for(o.cause) if o.outcome == "failed" else None,
                    "downstream_of": list(failed_below) if o.outcome == "failed" else [],
                    "headline": o.headline,
                    "checks": o.checks,
                }
            )
        if counts["failed"]:
            failed_below.append(layer)
    return {
        "format": REPORT_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "run": jsonable(run),
        "layers": layer_rows,
        "frameworks": jsonable(frameworks.worst(framework_checks(outcomes))),
        "tests": tests,
    }


def framework_checks(outcomes: list[Any]) -> list[dict[str, float]]:
    """The framework metrics of every engine-vs-trainer comparison of the semantic layer."""
    return [c["frameworks"] for o in outcomes for c in o.checks if c.get("layer") == "semantic" and c.get("frameworks")]


def dump_report(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=False) + "\n"
