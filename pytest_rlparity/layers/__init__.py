"""The three parity layers, lowest first: a failure in a lower layer explains failures above it."""

LAYERS = ("semantic", "inference_path", "objective")

LAYER_DOC = {
    "semantic": "the engine's logprobs mean what the trainer assumes (processed, aligned, complete)",
    "inference_path": "the same tokens get the same logprobs whatever path the engine takes",
    "objective": "RL objective metrics stay healthy when the layers below are clean",
}
