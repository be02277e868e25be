"""An engine's own output: passed through, and its root-cause line picked out when the engine dies."""

from __future__ import annotations

import subprocess
import sys

from pytest_rlparity.engines.processes import EngineOutput

CHILD = r"""
import sys
print("(Worker pid=8000) ERROR 11-23 03:20:38 [multiproc_executor.py:1063] RuntimeError: CPU Generator does not use offset")
print("(EngineCore pid=7969) ERROR 11-23 03:20:38 [core.py:1512] RuntimeError: Worker failed with error 'CPU Generator "
      "does not use offset', please check the stack trace above for the root cause", flush=True)
sys.stderr.write("Traceback (most recent call last):\nvllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n")
"""


def test_a_child_started_while_attached_has_its_last_real_error_named(capfd):
    output = EngineOutput()
    with output.attached():
        child = subprocess.Popen([sys.executable, "-c", CHILD])
    child.wait(timeout=60)
    assert output.root_cause() == "RuntimeError: CPU Generator does not use offset"  # not the wrappers that point "above"
    assert "CPU Generator does not use offset" in capfd.readouterr().out  # still shown where it was going


def test_no_error_line_is_an_empty_cause():
    output = EngineOutput()
    with output.attached():
        child = subprocess.Popen([sys.executable, "-c", "print('INFO loading weights')"])
    child.wait(timeout=60)
    assert output.root_cause() == ""
