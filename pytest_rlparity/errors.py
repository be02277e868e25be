"""Exceptions that carry what a person needs to act: the layer, the likely cause, what to do."""

from __future__ import annotations

import pytest


class ParityError(AssertionError):
    """A parity check failed. ``layer`` says where; ``cause`` names the likely culprit."""

    def __init__(self, message: str, *, layer: str, cause: str | None = None, headline: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.cause = cause
        self.headline = headline
        """One line for the session summary; defaults to the message's first line."""


class GoldenError(AssertionError):
    """A golden snapshot is missing, unreadable, from another model/configuration, or out of tolerance."""

    def __init__(self, message: str, *, headline: str | None = None) -> None:
        super().__init__(message)
        self.headline = headline


class EngineError(RuntimeError):
    """An engine could not be configured, started, or stopped answering."""


class ReferenceCheckError(pytest.UsageError):
    """The reference the engine is judged against (the fp32 trainer, its precision twin, the floor between
    them) is wrong or empty: no verdict is given, since one against a wrong reference means nothing."""


class RoutingReferenceError(ReferenceCheckError):
    """A reduced-precision mixture-of-experts reference: sound only where the engine's routes are replayed in the
    trainer (the MoE routing check), since elsewhere the twin's flipped routes move logprobs by nats."""


class RoutesUnavailable(EngineError):
    """The engine cannot say which experts it routed each token to; the message says why and what would."""
