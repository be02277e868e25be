"""Every option, defined once: its flag, ini key, default, choices and help, and how a value is read.

:data:`SPECS` is the only definition. ``pytest_addoption`` registers flags and ini keys from it,
:func:`resolve` reads them into :class:`Options` (command line < profile < ini < default, and
for engine kwargs all three merged), and ``python -m pytest_rlparity options`` prints the
README's table from it. Every value is checked here, once, at configure time: a bad one is a
single ``pytest.UsageError`` before any engine starts, never a ``ValueError`` in each fixture.

Engine kwargs use the engine's own names (vLLM's ``EngineArgs``), so a CI matrix can
flip one with ``--rlparity-engine-kwarg enable_prefix_caching=true`` and nothing else.
Values are parsed as JSON when they parse (``true``, ``0.3``, ``{"head_dtype": "float32"}``)
and kept as strings otherwise (``logprobs_mode=processed_logprobs``).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .engines.base import ENGINE_CORES, REQUEST_TIMEOUT_S, START_TIMEOUT_S


@dataclass(frozen=True)
class Spec:
    """One option: ``--rlparity-<name>`` on the command line and/or ini key ``rlparity_<name>``."""

    name: str
    """The :class:`Options` field (``engine_core``); flag and ini key are derived from it."""
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    flag: bool = True
    ini: bool = True
    path: bool = False
    """A path: relative to where pytest started (command line) or to the ini file (ini)."""

    @property
    def flag_name(self) -> str:
        """``--rlparity-engine-core``; ``--rlparity`` itself for ``enabled``; ``--rlparity-engine-kwarg`` (one kwarg
        per flag) for ``engine_kwargs``."""
        named = {"enabled": "", "engine_kwargs": "-engine-kwarg"}.get(self.name, "-" + self.name.replace("_", "-"))
        return "--rlparity" + named

    @property
    def dest(self) -> str:
        """The flag's name in ``config.getoption``."""
        return self.flag_name[2:].replace("-", "_")

    @property
    def ini_name(self) -> str:
        return f"rlparity_{self.name}"

    @property
    def flag_choices(self) -> tuple[str, ...]:
        """What the flag takes: ``--rlparity-update-goldens`` alone means ``mismatch``, so ``off`` is no choice."""
        return self.choices[1:] if self.name == "update_goldens" else self.choices


WORKER_EXITS = ("fast", "full")
PROFILE_KEYS = ("engine", "model", "engine_kwargs", "tolerance")

SPECS: tuple[Spec, ...] = (
    Spec("enabled", "run parity tests against a real engine (without it they are skipped)", False, ini=False),
    Spec("model", "local Hugging Face model directory (pytest-rlparity never downloads)", None, metavar="DIR", path=True),
    Spec("engine", "engine under test: a registered engine name (vllm, vllm-server, hf, or yours)", "vllm", metavar="NAME"),
    Spec(
        "engine_kwargs",
        "engine kwarg in the engine's own names, KEY=VALUE, the value parsed as JSON when it parses; repeatable "
        "(ini: one per line); checked against the installed engine before anything starts",
        {},
        metavar="KEY=VALUE",
    ),
    Spec("profile", f"TOML or JSON profile with keys {', '.join(PROFILE_KEYS)}", None, metavar="FILE", path=True),
    Spec("golden_dir", "where goldens live", "golden", metavar="DIR", path=True),
    Spec(
        "update_goldens",
        "write missing and out-of-tolerance goldens (mismatch, the value when none is given) or every golden "
        "the run touches (all)",
        "off",
        choices=("off", "mismatch", "all"),
        ini=False,
    ),
    Spec(
        "baseline",
        "migration: check against goldens recorded by another engine or engine version, read-only",
        None,
        metavar="DIR",
        ini=False,
        path=True,
    ),
    Spec("report", "JSON report of the run (default: report.json in the artifacts dir; 'none': not written)", None, metavar="PATH", path=True),
    Spec("artifacts_dir", "where the report and plots of a run are written", "rlparity-artifacts", flag=False, path=True),
    Spec("start_timeout", "seconds before an engine start is abandoned", START_TIMEOUT_S, float, metavar="SECONDS"),
    Spec("request_timeout", "seconds before one engine call is abandoned", REQUEST_TIMEOUT_S, float, metavar="SECONDS"),
    Spec("max_engines", "engines a process keeps running at once (the least recently used closes first)", 2, int, flag=False),
    Spec("seed", "added to the built-in suite's sampling seeds: another seed is another clean run", 0, int, metavar="N", ini=False),
    Spec("trainer_device", "where the trainer runs (cpu, cuda, cuda:1); default: the engine's device", None, metavar="DEVICE"),
    Spec(
        "engine_core",
        "where vLLM's engine core runs: inline (the pytest process), process, or auto (inline; a check that needs "
        "a process, a wait pause, gets one)",
        "auto",
        choices=("auto", *ENGINE_CORES),
    ),
    Spec(
        "server_url",
        "engine vllm-server: test the server at URL (started with VLLM_SERVER_DEV_MODE=1) instead of starting one",
        None,
        metavar="URL",
    ),
    Spec(
        "worker_exit",
        "how a pytest-xdist worker ends after its session: fast (without the interpreter's 2-3 s teardown) or full",
        "fast",
        choices=WORKER_EXITS,
        flag=False,
    ),
)
SPEC = {spec.name: spec for spec in SPECS}


def add_options(parser: pytest.Parser) -> None:
    """Register every flag and ini key of :data:`SPECS` (defaults are applied by :func:`resolve`)."""
    group = parser.getgroup("rlparity", "RL logprob parity (pytest-rlparity)")
    for spec in SPECS:
        if spec.flag:
            kwargs: dict[str, Any] = {"help": spec.help, "dest": spec.dest}
            if spec.name == "enabled":
                kwargs["action"] = "store_true"
            elif spec.choices:
                kwargs["choices"] = spec.flag_choices
            else:
                kwargs["metavar"] = spec.metavar
            if spec.name == "engine_kwargs":
                kwargs["action"] = "append"
            elif spec.name == "update_goldens":
                kwargs.update(nargs="?", const="mismatch")
            group.addoption(spec.flag_name, **kwargs)
        if spec.ini:
            listed = spec.name == "engine_kwargs"
            parser.addini(spec.ini_name, spec.help, type="linelist" if listed else "string", default=[] if listed else "")


def options_table() -> str:
    """The README's options table, from :data:`SPECS`."""
    rows = ["| option | ini key | default | what it does |", "|---|---|---|---|"]
    for spec in SPECS:
        flag = "—"
        if spec.flag:
            choices = "\\|".join(spec.flag_choices)  # a | inside a Markdown table cell is escaped
            flag = f"`{spec.flag_name}={choices}`" if spec.choices else f"`{spec.flag_name}`"
        default = "—" if spec.default in (None, {}) else "off" if spec.default is False else f"`{spec.default}`"
        rows.append(f"| {flag} | {f'`{spec.ini_name}`' if spec.ini else '—'} | {default} | {spec.help} |")
    return "\n".join(rows)


@dataclass
class Options:
    """The resolved settings of a parity session (defaults: :data:`SPECS`)."""

    enabled: bool
    engine: str = SPEC["engine"].default
    model: str | None = None
    model_seed: int = 0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Kwargs set by the user (the engine's defaults are added by the session)."""
    kwarg_sources: dict[str, str] = field(default_factory=dict)
    """For each user kwarg, where it was set (shown in the header)."""
    golden_dir: Path = Path(SPEC["golden_dir"].default)
    artifacts_dir: Path = Path(SPEC["artifacts_dir"].default)
    update_goldens: str = SPEC["update_goldens"].default
    baseline: bool = False
    """Migration mode: ``golden_dir`` holds another engine's goldens, read-only."""
    report: Path | None = None
    """Where the JSON report goes; ``None``: not written."""
    start_timeout: float = START_TIMEOUT_S
    request_timeout: float = REQUEST_TIMEOUT_S
    max_engines: int = SPEC["max_engines"].default
    seed: int = 0
    """Added to every sampling seed of the built-in suite: another seed is another clean run."""
    trainer_device: str | None = None
    """Where the trainer runs (``cpu``, ``cuda``, ``cuda:1``); default: the engine's device."""
    engine_core: str = SPEC["engine_core"].default
    """Where vLLM's engine core runs: ``inline`` (this process), ``process``, or ``auto``: inline, as
    colocated RL trainers run it (on CPU a spawned core spends 15 s importing torch and vLLM again; on
    a GPU the measured fast path, docs/benchmarks.md); checks that need a process get one."""
    server_url: str | None = None
    """A running vLLM server to test (``vllm-server`` engine) instead of starting one."""
    worker_exit: str = SPEC["worker_exit"].default
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
    """A TOML or JSON file with optional keys :data:`PROFILE_KEYS`."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise pytest.UsageError(f"rlparity profile {path} does not exist") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise pytest.UsageError(f"rlparity profile {path} is not valid {path.suffix or 'TOML'}: {exc}") from None
    unknown = sorted(set(data) - set(PROFILE_KEYS))
    if unknown:
        raise pytest.UsageError(f"rlparity profile {path}: unknown key(s) {unknown}; allowed: {sorted(PROFILE_KEYS)}")
    return data


PATH_OPTIONS = tuple(spec.flag_name for spec in SPECS if spec.path and spec.flag)


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


class _Reader:
    """Reads one option from the command line, then the ini file, then its default, parsed and checked."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def given(self, name: str) -> tuple[Any, str] | None:
        """The raw value and where it came from (``command line`` or ``ini``), or ``None``."""
        spec = SPEC[name]
        if spec.flag:
            value = self.config.getoption(spec.dest, default=None)
            if value not in (None, ""):
                return value, "command line"
        if spec.ini:
            value = self.config.getini(spec.ini_name)
            if value not in (None, ""):
                return value, "ini"
        return None

    def value(self, name: str) -> Any:
        spec = SPEC[name]
        given = self.given(name)
        if given is None:
            return self.path(spec.default, "ini") if spec.path and spec.default is not None else spec.default
        raw, source = given
        where = spec.flag_name if source == "command line" else f"ini key {spec.ini_name}"
        try:
            value = spec.parse(raw) if isinstance(raw, str) else raw
        except ValueError:
            kind = {"int": "a whole number", "float": "a number"}.get(spec.parse.__name__, spec.parse.__name__)
            raise pytest.UsageError(f"{where}: {raw!r} is not {kind}") from None
        if spec.choices and value not in spec.choices:
            raise pytest.UsageError(f"{where}: {value!r} is not one of {', '.join(spec.choices)}")
        if spec.path:
            return self.path(value, source)
        return value

    def path(self, value: str | Path, source: str) -> Path:
        """Relative to where pytest started (command line), or to the ini file (ini; where pytest started
        if there is none). Not relative to the rootdir: pytest derives it from every path-like argument,
        so ``--rlparity-model /models/x`` alone can move it to ``/``."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        config = self.config
        base = config.inipath.parent if source == "ini" and config.inipath else Path(config.invocation_params.dir)
        return base / path


def resolve(config: pytest.Config) -> Options:
    """Merge every source into :class:`Options` and check every value; raise ``pytest.UsageError`` on bad input."""
    read = _Reader(config)
    enabled = bool(config.getoption("rlparity"))
    if enabled:
        check_rootdir(config)
    update = config.getoption("rlparity_update_goldens") or ("mismatch" if config.getoption("snapshot_update", default=False) else "off")
    baseline = read.value("baseline")
    if baseline and update != "off":
        raise pytest.UsageError(
            "--rlparity-baseline is read-only: it checks this engine against goldens recorded by another. "
            "Record a baseline with --rlparity-update-goldens --rlparity-golden-dir=DIR, using the reference engine."
        )
    if baseline and not baseline.is_dir():
        raise pytest.UsageError(f"--rlparity-baseline {baseline}: no such directory (record one first, see docs/upgrading.md)")
    artifacts_dir = read.value("artifacts_dir")
    report_given = read.given("report")
    report = None if report_given and report_given[0] == "none" else read.value("report") if report_given else artifacts_dir / "report.json"
    options = Options(
        enabled=enabled,
        golden_dir=baseline or read.value("golden_dir"),
        artifacts_dir=artifacts_dir,
        update_goldens=update,
        baseline=bool(baseline),
        report=report,
        start_timeout=read.value("start_timeout"),
        request_timeout=read.value("request_timeout"),
        max_engines=read.value("max_engines"),
        seed=read.value("seed"),
        trainer_device=read.value("trainer_device"),
        engine_core=read.value("engine_core"),
        server_url=read.value("server_url"),
        worker_exit=read.value("worker_exit"),
    )
    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def merge(values: dict[str, Any], source: str) -> None:
        kwargs.update(values)
        sources.update(dict.fromkeys(values, source))

    merge(parse_kwargs(config.getini("rlparity_engine_kwargs")), "ini")
    ini_engine = config.getini("rlparity_engine")
    engine = ini_engine or SPEC["engine"].default
    ini_model = config.getini("rlparity_model")
    model = read.path(ini_model, "ini") if ini_model else None
    profile = read.value("profile")
    if profile:
        data = load_profile(profile)
        merge(dict(data.get("engine_kwargs", {})), f"profile {profile.name}")
        engine = data.get("engine", engine)
        if data.get("model"):
            model = (profile.parent / data["model"]).resolve()
        options.tolerance = dict(data.get("tolerance", {}))
    merge(parse_kwargs(config.getoption("rlparity_engine_kwarg") or []), "command line")
    engine = config.getoption("rlparity_engine") or engine
    if config.getoption("rlparity_model"):
        model = read.value("model").resolve()
    options.engine, options.model = engine, str(model) if model else None
    options.engine_kwargs, options.kwarg_sources = kwargs, sources
    if enabled:
        check(options)
    return options


DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16"}


def check(options: Options) -> None:
    """Every resolved value the engine and the checks will use, checked now: the engine's name and
    kwargs (against the installed engine), the dtype's numerics, the profile's tolerance keys and
    the model directory. One ``UsageError`` that names what to change."""
    from .engines.registry import engine_class
    from .errors import EngineError
    from .numerics import numerics_for

    try:
        cls = engine_class(options.engine)
    except EngineError as exc:
        raise pytest.UsageError(f"--rlparity-engine: {exc}") from None
    kwargs = options.engine_kwargs
    alias = str(kwargs.get("dtype", "")).removeprefix("torch.")
    if alias in DTYPE_ALIASES:
        kwargs["dtype"] = DTYPE_ALIASES[alias]
    effective = {**cls.default_kwargs, **kwargs}
    try:
        cls.validate_kwargs(effective)
    except EngineError as exc:
        raise pytest.UsageError(str(exc)) from None
    try:
        numerics_for(str(effective.get("dtype", "float32"))).tolerance.replace(**options.tolerance)
    except ValueError as exc:
        raise pytest.UsageError(f"rlparity: {exc} (engine kwarg dtype, or the profile's [tolerance] table)") from None
    if options.model is not None:
        from .model import check_model_dir

        try:
            check_model_dir(Path(options.model))
        except (ValueError, OSError) as exc:
            raise pytest.UsageError(
                f"--rlparity-model: {exc}. pytest-rlparity never downloads models; point it at a directory on disk."
            ) from None
