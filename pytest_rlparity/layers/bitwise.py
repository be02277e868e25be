"""The inference-path layer's batch-invariant tier: the same request, bit for bit, on every path.

vLLM's ``VLLM_BATCH_INVARIANT=1`` (GPU) swaps in kernels whose reductions do not depend on the
batch. vLLM promises that a request's output does not depend on the batch size or the order of the
requests in it (:data:`PROMISED`): those paths must differ by 0 bits. The tier measures three
more, which bitwise RL (a trainer matched bit for bit) needs too, and reports their bits without
failing: a cached vs a fresh prefix, chunked vs whole prefill, and sampled vs scored logprobs
(measured on vLLM 0.26.0, H200: the last is 0 bits, the first two are not). Elsewhere the layer
judges paths against tolerances; a run without the flag (the negative control) shows what the
flag removes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ParityError
from ..checks import publish
from . import causes
from .inference_path import LAYER
from .result import Finding

FLAG = "VLLM_BATCH_INVARIANT"

PROMISED = ("batch 1 vs N", "request order")
"""The paths vLLM's batch-invariance documentation promises are independent of batching."""


@dataclass(frozen=True)
class BitDifference:
    """Two paths' logprobs of the same tokens, compared as float32 bit patterns."""

    path: str
    values: int
    """Logprobs compared (positions where both paths have the same tokens so far)."""
    differing: int
    """Of those, how many differ in at least one bit."""
    bits: int
    """Differing bits in all (popcount of the XOR of the float32 patterns)."""
    max_abs: float
    diverged: int
    """Requests whose tokens differ from some position on (only the positions before are compared)."""

    @property
    def equal(self) -> bool:
        return self.differing == 0 and self.diverged == 0

    def check_entry(self) -> dict[str, object]:
        return {"path": self.path, "values": self.values, "differing": self.differing, "bits": self.bits,
                "max_abs": self.max_abs, "diverged_requests": self.diverged}


def bit_difference(
    path: str,
    first: Sequence[Sequence[float]],
    second: Sequence[Sequence[float]],
    first_tokens: Sequence[Sequence[int]] | None = None,
    second_tokens: Sequence[Sequence[int]] | None = None,
) -> BitDifference:
    """Compare logprobs request by request, up to where the requests' tokens diverge (if tokens are given)."""
    values = differing = bits = diverged = 0
    max_abs = 0.0
    for i, (a, b) in enumerate(zip(first, second)):
        n = min(len(a), len(b))
        if first_tokens is not None and second_tokens is not None:
            ta, tb = first_tokens[i], second_tokens[i]
            same = next((p for p, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            if same < max(len(ta), len(tb)):
                diverged += 1
            n = min(n, same)  # from there on the paths score other tokens
        for x, y in zip(a[:n], b[:n]):
            values += 1
            xor = _bits(x) ^ _bits(y)
            if xor:
                differing += 1
                bits += xor.bit_count()
                if math.isfinite(x) and math.isfinite(y):
                    max_abs = max(max_abs, abs(x - y))
    return BitDifference(path, values, differing, bits, max_abs, diverged)


def _bits(value: float) -> int:
    return int.from_bytes(struct.pack("<f", value), "little")


def check_bitwise(differences: Sequence[BitDifference], *, invariant: bool, label: str) -> None:
    """Publish every path's count; with the flag on, raise a :class:`ParityError` naming each
    :data:`PROMISED` path that differs. Other paths are reported, never failed; without the flag
    (``invariant=False``) nothing fails: the negative control."""
    __tracebackhide__ = True
    failing = [d for d in differences if d.path in PROMISED and not d.equal]
    publish({
        "kind": "bitwise", "label": label, "layer": LAYER, "batch_invariant": invariant,
        "verdict": "fail" if invariant and failing else "pass",
        "paths": [{**d.check_entry(), "promised": d.path in PROMISED} for d in differences],
    })
    if not invariant or not failing:
        return
    findings = [
        Finding(
            causes.BATCH_INVARIANCE,
            f"{d.path}: {d.differing} of {d.values} logprobs differ ({d.bits} bits, max |Δ| {d.max_abs:.3g})"
            + (f"; {d.diverged} request(s) sampled other tokens" if d.diverged else ""),
        )
        for d in failing
    ]
    lines = [f"[{LAYER}] {label}: not bitwise equal with {FLAG}=1"] + [f"  - {f.cause}: {f.message}" for f in findings]
    raise ParityError("\n".join(lines), layer=LAYER, cause=str(causes.BATCH_INVARIANCE), headline=f"{label}: {findings[0].message}")
