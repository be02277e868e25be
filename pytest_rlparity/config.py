"""Where settings come from: built-in defaults < ini/pyproject < profile file < command line.

Engine kwargs use the engine's own names (vLLM's ``EngineArgs``), so a CI matrix can
flip one with ``--rlparity-engine-kwarg enable_prefix_caching=true`` and nothing else.
Values are parsed as JSON when they parse (``true``, ``0.3``, ``{"head_dtype": "float32"}``)
and kept as strings otherwise (``logprobs_mode=processed_logprobs``).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ENGINE_CORES = ("auto", "inline", "process")
WORKER_EXITS = ("fast", "full")


@dataclass
class Options:
    """The resolved settings of a parity session."""

    enabled: bool
    engine: str = "vllm"
    model: str | None = None
    model_seed: int = 0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Kwargs set by the user (the engine's defaults are added by the session)."""
    kwarg_sources: dict[str, str] = field(default_factory=dict)
    """For each user kwarg, where it was set (shown in the header)."""
    golden_dir: Path = Path("golden")
    artifacts_dir: Path = Path("rlparity-artifacts")
    update_goldens: str = "off"
    baseline: bool = False
    """Migration mode: ``golden_dir`` holds another engine's goldens, read-only."""
    report: Path | None = None
    """Where the JSON report goes; ``None``: not written."""
    start_timeout: float = 600.0
    request_timeout: float = 300.0
    max_engines: int = 2
    seed: int = 0
    """Added to every sampling seed of the built-in suite: another seed is another clean run."""
    trainer_device: str | None = None
    """Where the trainer runs (``cpu``, ``cuda``, ``cuda:1``); default: the engine's device."""
    engine_core: str = "auto"
    """Where vLLM's engine core runs: ``inline`` (this process), ``process``, or ``auto`` (inline on
    CPU, where a spawned core spends 15 s importing torch and vLLM again; a process on GPUs)."""
    server_url: str | None = None
    """A running vLLM server to test (``vllm-server`` engine) instead of starting one."""
    worker_exit: str = "fast"
    """How a pytest-xdist worker ends once its session is over: ``fast`` (without the interpreter's
    teardown, :mod:`pytest_rlparity.worker_exit`) or ``full``."""
    tolerance: dict[str, Any] = field(default_factory=dict)
    """Overrides of :class:`~pytest_rlparity.settings.Tolerance` fields from a profile."""


def parse_kwarg(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as JSON when it parses."""
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise pytest.UsageError(f"engine kwarg {item!r} is not KEY=VALUE (e.g. logprobs_mode=processed_logprobs)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def parse_kwargs(items: Iterable[str]) -> dict[str, Any]:
    return dict(parse_kwarg(i) for i in items if i.strip())


def load_profile(path: Path) -> dict[str, Any]:
    """A TOML or JSON file with optional keys ``engine``, ``model``, ``engine_kwargs``, ``tolerance``."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise pytest.UsageError(f"rlparity profile {path} does not exist") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise pytest.UsageError(f"rlparity profile {path} is not valid {path.suffix or 'TOML'}: {exc}") from None
    allowed = {"engine", "model", "engine_kwargs", "tolerance"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise pytest.UsageError(f"rlparity profile {path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return data


PATH_OPTIONS = ("--rlparity-model", "--rlparity-baseline", "--rlparity-golden-dir", "--rlparity-profile", "--rlparity-report")


def check_rootdir(config: pytest.Config) -> None:
    """Refuse an option value that pytest took for a test path when it chose the rootdir.

    pytest picks the rootdir and ini file before plugins register their options, so in
    ``--rlparity-baseline /goldens/old`` it treats ``/goldens/old`` as a path to test: a
    path outside the working directory then moves the rootdir and loses the project's ini
    file (and its ``testpaths``). The ``--option=value`` form does not have this problem.
    """
    args = list(config.invocation_params.args)
    invocation = Path(config.invocation_params.dir).resolve()
    moved = []
    for i, arg in enumerate(args[:-1]):
        value = Path(args[i + 1]).expanduser()
        value = (value if value.is_absolute() else invocation / value).resolve()
        if arg in PATH_OPTIONS and value.exists() and invocation not in (value, *value.parents):
            moved.append(f"{arg}={args[i + 1]}")
    if moved:
        raise pytest.UsageError(
            f"pytest takes a path given as a separate argument to an rlparity option for a test path, and one "
            f"outside this directory moves the rootdir (now {config.rootpath}) away from your pytest configuration. "
            f"Write these options with '=': {' '.join(moved)}"
        )


def resolve(config: pytest.Config) -> Options:
    """Merge every source into :class:`Options`; raise ``pytest.UsageError`` on bad input."""
    opt = config.getoption
    if opt("rlparity"):
        check_rootdir(config)
    update = opt("rlparity_update_goldens") or ("mismatch" if opt("snapshot_update", default=False) else "off")
    baseline = opt("rlparity_baseline")
    if baseline and update != "off":
        raise pytest.UsageError(
            "--rlparity-baseline is read-only: it checks this engine against goldens recorded by another. "
            "Record a baseline with --rlparity-update-goldens --rlparity-golden-dir=DIR, using the reference engine."
        )
    if baseline and not _cli_path(config, baseline).is_dir():
        raise pytest.UsageError(f"--rlparity-baseline {baseline}: no such directory (record one first, see docs/upgrading.md)")
    artifacts_dir = _ini_path(config, config.getini("rlparity_artifacts_dir"))
    report_cli, report_ini = opt("rlparity_report"), config.getini("rlparity_report")
    report = _cli_path(config, report_cli) if report_cli else _ini_path(config, report_ini) if report_ini else artifacts_dir / "report.json"
    options = Options(
        enabled=bool(opt("rlparity")),
        golden_dir=(
            _cli_path(config, baseline or opt("rlparity_golden_dir"))
            if baseline or opt("rlparity_golden_dir")
            else _ini_path(config, config.getini("rlparity_golden_dir"))
        ),
        artifacts_dir=artifacts_dir,
        update_goldens=update,
        baseline=bool(baseline),
        report=None if (report_cli or report_ini) == "none" else report,
        start_timeout=float(opt("rlparity_start_timeout") or config.getini("rlparity_start_timeout")),
        request_timeout=float(opt("rlparity_request_timeout") or config.getini("rlparity_request_timeout")),
        max_engines=int(config.getini("rlparity_max_engines")),
        seed=int(opt("rlparity_seed") or 0),
        trainer_device=opt("rlparity_trainer_device") or config.getini("rlparity_trainer_device") or None,
        engine_core=opt("rlparity_engine_core") or config.getini("rlparity_engine_core") or "auto",
        server_url=opt("rlparity_server_url") or config.getini("rlparity_server_url") or None,
        worker_exit=config.getini("rlparity_worker_exit") or "fast",
    )
    if options.engine_core not in ENGINE_CORES:
        raise pytest.UsageError(f"rlparity_engine_core {options.engine_core!r}: choose one of {', '.join(ENGINE_CORES)}")
    if options.worker_exit not in WORKER_EXITS:
        raise pytest.UsageError(f"rlparity_worker_exit {options.worker_exit!r}: choose one of {', '.join(WORKER_EXITS)}")
    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def merge(values: dict[str, Any], source: str) -> None:
        kwargs.update(values)
        sources.update(dict.fromkeys(values, source))

    merge(parse_kwargs(config.getini("rlparity_engine_kwargs")), "ini")
    engine = config.getini("rlparity_engine") or "vllm"
    model = config.getini("rlparity_model") or None
    model = str(_ini_path(config, model)) if model else None
    profile_cli, profile_ini = opt("rlparity_profile"), config.getini("rlparity_profile")
    if profile_cli or profile_ini:
        path = _cli_path(config, profile_cli) if profile_cli else _ini_path(config, profile_ini)
        profile = load_profile(path)
        merge(dict(profile.get("engine_kwargs", {})), f"profile {path.name}")
        engine = profile.get("engine", engine)
        if profile.get("model"):
            model = str((path.parent / profile["model"]).resolve())
        options.tolerance = dict(profile.get("tolerance", {}))
    merge(parse_kwargs(opt("rlparity_engine_kwarg") or []), "command line")
    engine = opt("rlparity_engine") or engine
    if opt("rlparity_model"):
        model = str(Path(opt("rlparity_model")).expanduser().resolve())
    from .engines.registry import engine_class
    from .errors import EngineError

    try:
        engine_class(engine)
    except EngineError as exc:
        raise pytest.UsageError(f"--rlparity-engine: {exc}") from None
    if model is not None:
        from .model import check_model_dir

        try:
            check_model_dir(Path(model))
        except (ValueError, OSError) as exc:
            raise pytest.UsageError(
                f"--rlparity-model: {exc}. pytest-rlparity never downloads models; point it at a directory on disk."
            ) from None
    options.engine, options.model = engine, model
    options.engine_kwargs, options.kwarg_sources = kwargs, sources
    return options


def _cli_path(config: pytest.Config, value: str | Path) -> Path:
    """A path from the command line: relative to where pytest was started."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(config.invocation_params.dir) / path


def _ini_path(config: pytest.Config, value: str | Path) -> Path:
    """A path from the ini file: relative to that file, or to where pytest was started if there is none.

    Not relative to the rootdir: pytest derives it from every path-like argument, so
    ``--rlparity-model /models/x`` alone can move it to ``/``.
    """
    path = Path(value).expanduser()
    base = config.inipath.parent if config.inipath else Path(config.invocation_params.dir)
    return path if path.is_absolute() else base / path
