"""How a pytest-xdist worker of a parity run ends: every exit handler runs, the interpreter's teardown does not."""

from __future__ import annotations

import pytest

from tests.conftest import run_pytest

LEAVES_WORK_FOR_THE_EXIT = '''
import atexit
import logging
import logging.handlers
import os
import weakref
from pathlib import Path

OUT = Path(os.environ["EXIT_PROBE_DIR"])


class Teardown:
    def __del__(self, path=str(OUT / "teardown"), open=open):  # builtins are gone by the teardown's end
        with open(path, "w") as f:
            f.write("ran")


ALIVE_AT_EXIT = [Teardown()]


def test_leaves_work_for_the_exit():
    atexit.register((OUT / "atexit").write_text, "ran")
    ALIVE_AT_EXIT.append(box := type("Box", (), {})())
    weakref.finalize(box, (OUT / "finalizer").write_text, "ran")
    buffered = logging.handlers.MemoryHandler(100, target=logging.FileHandler(OUT / "log"))  # written at logging's shutdown
    logging.getLogger("exit-probe").addHandler(buffered)
    logging.getLogger("exit-probe").warning("ran")
'''


@pytest.mark.parametrize(
    ("args", "left"),
    [
        (["-n", "1"], ["atexit", "finalizer", "log"]),
        (["-n", "1", "-o", "rlparity_worker_exit=full"], ["atexit", "finalizer", "log", "teardown"]),
        ([], ["atexit", "finalizer", "log", "teardown"]),  # no worker: pytest's own process ends as Python ends it
    ],
    ids=["worker", "worker-full-exit", "no-worker"],
)
def test_a_worker_ends_after_its_exit_handlers_without_the_interpreters_teardown(tmp_path, args, left):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_exit.py").write_text(LEAVES_WORK_FOR_THE_EXIT)
    result = run_pytest("--rlparity", "--rlparity-report=none", *args, "test_exit.py", cwd=tmp_path, env={"EXIT_PROBE_DIR": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == left
    assert (out / "log").read_text() == "ran\n"


def test_an_unknown_worker_exit_is_refused(tmp_path):
    result = run_pytest("--rlparity", "-o", "rlparity_worker_exit=quick", cwd=tmp_path)
    assert result.returncode == 4 and "ini key rlparity_worker_exit: 'quick' is not one of fast, full" in result.stderr
