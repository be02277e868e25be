"""Workers of a parity run that share a CPU: each its share of the cores, in OpenMP threads that wait without
spinning (pytest_rlparity.cpu_workers)."""

from __future__ import annotations

import pytest

from pytest_rlparity.cpu_workers import cores
from pytest_rlparity.scheduling import auto_workers
from tests.conftest import run_pytest

SEES_THE_POLICY = '''
import os
from pathlib import Path


def test_sees_the_policy():
    seen = (os.environ.get(name, "unset") for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"))
    Path(os.environ["POLICY_SEEN"]).write_text(" ".join(seen))
'''


ON_CPU = "--rlparity-trainer-device=cpu"
SHARE = max(1, cores() // 2)
"""Threads a worker of two gets: one on a 2-core machine."""


@pytest.mark.parametrize(
    ("args", "env", "seen"),
    [
        ([ON_CPU, "-n", "2"], {}, f"PASSIVE {SHARE}"),
        ([ON_CPU, "-n", "auto"], {}, f"PASSIVE {max(1, cores() // auto_workers('cpu'))}"),
        ([ON_CPU, "-n", "2"], {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}, "ACTIVE 3"),  # the user's own choice stays
        ([ON_CPU], {}, "unset unset"),  # one process: nothing to share
        (["--rlparity-trainer-device=cuda", "-n", "2"], {}, "unset unset"),  # the workers compute on a GPU
    ],
    ids=["two-workers", "auto-workers", "set-by-the-user", "no-workers", "gpu-trainer"],
)
def test_workers_on_the_cpu_share_its_cores_and_wait_passively(tmp_path, monkeypatch, args, env, seen):
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # this session's own, from tests/conftest.py
    (tmp_path / "test_policy.py").write_text(SEES_THE_POLICY)
    out = tmp_path / "seen"
    result = run_pytest("--rlparity", "--rlparity-report=none", *args, "test_policy.py", cwd=tmp_path, env={"POLICY_SEEN": str(out), **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.read_text() == seen
