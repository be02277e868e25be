"""Fixtures for parity tests: engines, the tiny trainer, prompts, tolerances, goldens.

All of them skip the test unless pytest runs with ``--rlparity``, so a suite that uses
them stays cheap in ordinary runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .golden import GoldenRecord
from .layers import LAYERS
from .numerics import numerics_for
from .session import RLParitySession
from .settings import Tolerance

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
def rlparity_engine(rlparity_session: RLParitySession) -> Any:
    """The engine under test with the session's kwargs (defaults, ini, profile, command line)."""
    return rlparity_session.engine()


@pytest.fixture(scope="session")
def rlparity_engine_factory(rlparity_session: RLParitySession) -> Callable[..., Any]:
    """``factory(**kwarg_overrides)`` -> a running engine; engines are shared per configuration."""
    return rlparity_session.engine


@pytest.fixture(scope="session")
def rlparity_trainer(rlparity_session: RLParitySession) -> Any:
    """The trainer in fp32 (body and lm_head) on the engine's device: the recompute the engine must match.

    For a bf16/fp16 engine it carries a precision twin (``Recompute.floor``, ``score_floor``):
    the same weights in the engine's precision, which the engine's tolerance is scaled to.
    """
    return rlparity_session.trainer()


@pytest.fixture(scope="session")
def rlparity_trainer_factory(rlparity_session: RLParitySession) -> Callable[..., Any]:
    """``factory(dtype="bfloat16", head_dtype="float32", model_dir=None, twin="engine")`` -> a trainer with that
    numerical path (``twin``: the precision twin's ``(dtype, head_dtype)``, ``None``, or the engine's)."""
    return rlparity_session.trainer


@pytest.fixture(scope="session")
def rlparity_tolerance(rlparity_session: RLParitySession) -> Tolerance:
    """The default engine-vs-trainer tolerance for the engine's dtype, with profile overrides."""
    return rlparity_session.tolerance()


@pytest.fixture(scope="session")
def rlparity_prompts(rlparity_trainer: Any) -> list[list[int]]:
    """Built-in prompts as token ids: the start of each sentence of the embedded corpus."""
    from .model import CORPUS

    return [rlparity_trainer.tokenizer(" ".join(s.split()[:4])).input_ids for s in CORPUS]


class GoldenCheck:
    """Compares one test's record with its golden; bound to the test by :func:`rlparity_golden`."""

    def __init__(self, session: RLParitySession, node: pytest.Item) -> None:
        self.session = session
        self.node = node

    def path(self, info: Any, name: str | None = None) -> Path:
        """Where this test's golden lives for ``info``'s platform."""
        layer = next((m for m in LAYERS if self.node.get_closest_marker(m)), "custom")
        return self.session.goldens.path_for(info.platform, layer, name or self.node.name)

    def check(self, record: GoldenRecord, info: Any, name: str | None = None) -> None:
        """Compare with (or, when updating, write) the golden for this test on ``info``'s platform."""
        self.session.goldens.check(
            self.path(info, name),
            record,
            numerics_for(info.dtype).golden,
            provenance=self.session.provenance(info),
            nodeid=self.nodeid,
        )

    @property
    def nodeid(self) -> str:
        """The test's node id as a command line selects it: without the ``@group`` that pytest-xdist's
        ``--dist loadgroup`` appends."""
        group = self.node.get_closest_marker("xdist_group")
        name = (group.args[0] if group.args else group.kwargs.get("name")) if group else None
        return self.node.nodeid.removesuffix(f"@{name}") if name else self.node.nodeid


@pytest.fixture
def rlparity_golden(rlparity_session: RLParitySession, request: pytest.FixtureRequest) -> GoldenCheck:
    """Golden snapshot of this test: ``rlparity_golden.check(record, engine.info)``."""
    return GoldenCheck(rlparity_session, request.node)
