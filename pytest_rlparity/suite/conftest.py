"""Fixtures the built-in suite's layers share."""

from __future__ import annotations

import pytest

from pytest_rlparity.suite import shared_prefix_prompts


@pytest.fixture(scope="session")
def long_prompts(rlparity_trainer) -> list[list[int]]:
    """Prompts longer than two prefix-cache blocks and five prefill chunks (:func:`shared_prefix_prompts`)."""
    return shared_prefix_prompts(rlparity_trainer.tokenizer)
