"""Workers of a parity run that share a CPU: OpenMP threads that wait without spinning (pytest_rlparity.cpu_workers)."""

from __future__ import annotations

import pytest

from tests.conftest import run_pytest

SEES_THE_POLICY = '''
import os
from pathlib import Path


def test_sees_the_policy():
    Path(os.environ["POLICY_SEEN"]).write_text(os.environ.get("OMP_WAIT_POLICY", "unset"))
'''


ON_CPU = "--rlparity-trainer-device=cpu"


@pytest.mark.parametrize(
    ("args", "env", "seen"),
    [
        ([ON_CPU, "-n", "2"], {}, "PASSIVE"),
        ([ON_CPU, "-n", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's own choice stays
        ([ON_CPU], {}, "unset"),  # one process: nothing to share
        (["--rlparity-trainer-device=cuda", "-n", "2"], {}, "unset"),  # the workers compute on a GPU
    ],
    ids=["two-workers", "set-by-the-user", "no-workers", "gpu-trainer"],
)
def test_workers_on_the_cpu_wait_passively(tmp_path, monkeypatch, args, env, seen):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # this session's own, from tests/conftest.py
    (tmp_path / "test_policy.py").write_text(SEES_THE_POLICY)
    out = tmp_path / "seen"
    result = run_pytest("--rlparity", "--rlparity-report=none", *args, "test_policy.py", cwd=tmp_path, env={"POLICY_SEEN": str(out), **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.read_text() == seen
