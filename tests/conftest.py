"""Shared pieces of the project's tests: the embedded model, a trainer, the reference engine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# Two xdist workers share this machine's cores: OpenMP threads that sleep at a barrier instead of
# spinning, as a parity run on several workers has them (pytest_rlparity.cpu_workers). Set before
# torch loads OpenMP; inherited by the workers, the pytest runs the tests start and their engines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# pytester's in-process runs drop modules first imported inside them, and parts of torch
# cannot be imported twice: import what loading the trainer pulls in, once, up front.
import torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from pytest_rlparity.model import cache_root

REPO = Path(__file__).resolve().parents[1]

# pytester points HOME at a temporary directory; keep using one model cache.
os.environ.setdefault("RLPARITY_CACHE_DIR", str(cache_root()))


RUN_TAG = "RLPARITY_TEST_RUN"
"""Set in the environment of pytest runs started by the tests; their engines inherit it."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the runs of a real engine first (the tests that check for leaked engines): the
    long ones then overlap the many short ones instead of ending the session alone."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: "no_leaked_engines" not in item.fixturenames)


def run_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", RUN_TAG: str(os.getpid())}


def run_pytest(
    *args: str, cwd: Path | None = None, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run pytest in a fresh interpreter, as a user would (with ``env`` added to the environment), and capture what it prints."""
    env = {**run_env(), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def vllm_processes() -> set[int]:
    """vLLM processes started by pytest runs of this test session (tagged through the environment)."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            name = proc.info["name"] or ""
            cmdline = " ".join(proc.info["cmdline"] or [])
            engine = "VLLM" in name or "EngineCore" in cmdline or "vllm.entrypoints" in cmdline
            if proc.status() == psutil.STATUS_ZOMBIE or not engine:
                continue
            if proc.environ().get(RUN_TAG) == str(os.getpid()):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def no_leaked_engines():
    before = vllm_processes()
    yield
    deadline = time.monotonic() + 10
    while (leaked := vllm_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leaked, f"vLLM processes outlived the pytest session: {leaked}"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from pytest_rlparity.model import embedded_model

    return embedded_model()


@pytest.fixture(scope="session")
def trainer(tiny_model):
    from pytest_rlparity.trainer.recompute import Trainer

    return Trainer(tiny_model)


@pytest.fixture(scope="session")
def prompts(trainer) -> list[list[int]]:
    from pytest_rlparity.model import corpus_prompts

    return corpus_prompts(trainer.tokenizer)[:6]


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    from pytest_rlparity.engines.hf import HFEngine

    return HFEngine(str(tiny_model), {})
