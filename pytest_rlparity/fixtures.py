"""Fixtures for parity tests: engines, the tiny trainer, prompts, tolerances, goldens.

All of them skip the test unless pytest runs with ``--rlparity``, so a suite that uses
them stays cheap in ordinary runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .golden import Snapshot
from .layers import CUSTOM, layer_of
from .numerics import numerics_for
from .scheduling import without_group
from .session import RLParitySession
from .settings import Tolerance

if TYPE_CHECKING:
    from .engines.base import EngineInfo
    from .engines.pool import EngineHandle
    from .trainer.recompute import Trainer

SESSION_KEY = pytest.StashKey[RLParitySession]()

DISABLED_REASON = "parity tests start a real engine: run pytest with --rlparity"


def get_session(config: pytest.Config) -> RLParitySession | None:
    return config.stash.get(SESSION_KEY, None)


@pytest.fixture(scope="session")
def rlparity_session(request: pytest.FixtureRequest) -> RLParitySession:
    """The run's :class:`~pytest_rlparity.session.RLParitySession` (skips without ``--rlparity``)."""
    session = get_session(request.config)
    if session is None:
        pytest.skip(DISABLED_REASON)
    return session


@pytest.fixture(scope="session")
def rlparity_engine(rlparity_session: RLParitySession) -> EngineHandle:
    """The engine under test with the session's kwargs (defaults, ini, profile, command line).

    Example::

        def test_greedy(rlparity_engine, rlparity_trainer, rlparity_prompts, rlparity_tolerance):
            settings = SamplingSettings(temperature=0.0, max_tokens=16)
            completions = rlparity_engine.generate(rlparity_prompts, settings)
            trainer = rlparity_trainer.recompute(completions, settings)
            assert_logprobs_close([c.logprobs for c in completions], trainer.processed, rlparity_tolerance)
    """
    return rlparity_session.engine()


@pytest.fixture(scope="session")
def rlparity_engine_factory(rlparity_session: RLParitySession) -> Callable[..., EngineHandle]:
    """``factory(**kwarg_overrides)`` -> a running engine with the session's kwargs and these on top;
    engines are shared per configuration and closed at the end of the session, or sooner by the
    handle's ``release()`` where no later test needs that configuration (a class-scoped fixture's
    teardown, say): its memory and processes go at once.

    :param kwarg_overrides: engine kwargs, e.g. ``factory(enable_prefix_caching=True)``;
        ``engine_core="process"`` runs a vLLM engine core in a process of its own;
        ``model="path/to/dir"`` serves another local model.
    """
    return rlparity_session.engine


@pytest.fixture(scope="session")
def rlparity_trainer(rlparity_session: RLParitySession) -> Trainer:
    """The trainer in fp32 (body and lm_head) on the engine's device: the recompute the engine must match.

    For a bf16/fp16 engine it carries a precision twin (``Recompute.twin``, ``score_twin``):
    the same weights in the engine's precision, which the engine's tolerance is scaled to.
    """
    return rlparity_session.trainer()


@pytest.fixture(scope="session")
def rlparity_trainer_factory(rlparity_session: RLParitySession) -> Callable[..., Trainer]:
    """``factory(dtype="float32", head_dtype=None, model_dir=None, twin="engine")`` -> a trainer with that
    numerical path, shared per configuration.

    :param dtype: the body's dtype, e.g. ``"bfloat16"``.
    :param head_dtype: the lm_head's dtype (default: ``dtype``), e.g. ``"float32"`` as MiniMax-M1 computes it.
    :param model_dir: another local model directory (default: the session's model).
    :param twin: the precision twin's ``(dtype, head_dtype)``, ``None`` for none, or ``"engine"``: the engine's.
    """
    return rlparity_session.trainer


@pytest.fixture(scope="session")
def rlparity_tolerance(rlparity_session: RLParitySession) -> Tolerance:
    """The default engine-vs-trainer tolerance for the engine's dtype, with profile overrides."""
    return rlparity_session.tolerance()


@pytest.fixture(scope="session")
def rlparity_prompts(rlparity_trainer: Trainer) -> list[list[int]]:
    """Built-in prompts as token ids: the start of each sentence of the embedded corpus."""
    from .model import corpus_prompts

    return corpus_prompts(rlparity_trainer.tokenizer)


class GoldenCheck:
    """Compares one test's snapshot with its golden; bound to the test by :func:`rlparity_golden`."""

    def __init__(self, session: RLParitySession, node: pytest.Item) -> None:
        self.session = session
        self.node = node

    def path(self, info: EngineInfo, name: str | None = None) -> Path:
        """Where this test's golden lives for ``info``'s platform."""
        layer = layer_of(self.node) or CUSTOM
        return self.session.goldens.path_for(info.platform, layer, name or self.node.name)

    def check(self, snapshot: Snapshot, info: EngineInfo, name: str | None = None) -> None:
        """Compare with (or, when updating, write) the golden for this test on ``info``'s platform.

        :param snapshot: what to keep, e.g. ``snapshot_from(completions, comparison, settings.to_dict())``
            (:func:`~pytest_rlparity.golden.snapshot_from`).
        :param info: the engine's :class:`~pytest_rlparity.engines.base.EngineInfo` (its platform picks the directory).
        :param name: the golden's file name when a test keeps more than one (default: the test's name).
        """
        __tracebackhide__ = True
        self.session.goldens.check(
            self.path(info, name),
            snapshot,
            numerics_for(info.dtype).golden,
            provenance=self.session.provenance(info),
            nodeid=self.nodeid,
        )

    @property
    def nodeid(self) -> str:
        """The test's node id as a command line selects it: without the ``@group`` that pytest-xdist's
        ``--dist loadgroup`` appends."""
        return without_group(self.node.nodeid)


@pytest.fixture
def rlparity_golden(rlparity_session: RLParitySession, request: pytest.FixtureRequest) -> GoldenCheck:
    """Golden snapshot of this test: ``rlparity_golden.check(snapshot, engine.info)``."""
    return GoldenCheck(rlparity_session, request.node)
