"""The three parity layers, lowest first: a failure in a lower layer explains failures above it."""

from typing import Any

LAYERS = ("semantic", "inference_path", "objective")

LAYER_DOC = {
    "semantic": "the engine's logprobs mean what the trainer assumes (processed, aligned, complete)",
    "inference_path": "the same tokens get the same logprobs whatever path the engine takes",
    "objective": "RL objective metrics stay healthy when the layers below are clean",
}


CUSTOM = "custom"
"""The layer of a parity test that carries no layer marker (a user's own ``rlparity`` test)."""


def layer_of(node: Any) -> str | None:
    """The layer of a test item (its markers and those of its class and module) or of its report (the
    item's keywords, which carry those markers): the first of :data:`LAYERS` it carries, or ``None``."""
    marked = {m.name for m in node.iter_markers()} if hasattr(node, "iter_markers") else node.keywords
    return next((layer for layer in LAYERS if layer in marked), None)
