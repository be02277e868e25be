"""Engine groups across pytest-xdist workers: the longest group first, one group at a time per worker.

Under ``pytest -n N --dist loadgroup`` every test's ``xdist_group`` names the engine configuration
it uses, so a group is a worker's engine start plus its checks. pytest-xdist hands out groups by
test count and queues another group on a worker while it still has two tests to run; a run then
ends with one worker starting the small groups' engines one after another while the others wait
(measured on an H100: five starts in a row on one of four workers). Here a worker gets its next
group only when its last test is about to run, and the groups the built-in suite knows to be long
go first (:data:`pytest_rlparity.suite.LONGEST_FIRST`); other groups follow, most tests first. A
worker whose group is a single test must know its next one before it runs it: it gets the shortest
group left, so that the long ones go to the workers that finish first.

Relies on pytest-xdist's ``LoadGroupScheduling`` internals (3.x: ``workqueue``,
``_assign_work_unit``, ``_pending_of``); where they are missing, pytest-xdist schedules as usual.

pytest 9.2 derives node ids from a structured id that pytest-xdist 3.8 does not update, so
``--dist loadgroup`` silently stops grouping there (pytest-xdist issue #1386: every test of a
group may start the group's engine in another worker). :func:`keep_xdist_groups` puts the group
back into the node id where the schedulers read it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from .cpu_workers import cores

SESSION_ENGINE_GROUP = "session-engine"
"""The xdist group of every test on the session's engine (``rlparity_engine``): its configuration starts
in one worker, not in each worker that happens to get one of its tests."""

AUTO_WORKERS = {"cpu": 2, "cuda": 5}
"""Workers for ``pytest --rlparity -n auto``, by the engine's device. On CPU two workers, each on its
share of the cores (``cpu_workers``), are the measured best on 2 cores (docs/benchmarks.md). On a GPU
the suite's five long groups (the in-flight checks' process start, three RL runs, the path checks)
each take a worker and the short groups fill in behind them: more workers only start more engines."""


def xdist_group_of(item: pytest.Item) -> str | None:
    """The test's xdist group as pytest-xdist names it: its ``xdist_group`` names, sorted, joined by ``_``."""
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    return "_".join(sorted(names)) if names else None


def without_group(nodeid: str) -> str:
    """A node id as a command line selects it: without the ``@group`` that ``--dist loadgroup`` appends
    (a parametrized id ends in ``]``, so an ``@`` inside its brackets is kept)."""
    return re.sub(r"@[\w.\-]+$", "", nodeid)


def group_session_engine_tests(item: pytest.Item) -> None:
    """Put a test that uses the session's engine and names no group into :data:`SESSION_ENGINE_GROUP`."""
    if "rlparity_engine" in getattr(item, "fixturenames", ()) and xdist_group_of(item) is None:
        item.add_marker(pytest.mark.xdist_group(SESSION_ENGINE_GROUP))


def auto_workers(device: str) -> int:
    """:data:`AUTO_WORKERS` for ``device``, never more than the cores this process may run on (a container
    limited to fewer cores than its host gets fewer workers, as their thread share counts them)."""
    return max(1, min(AUTO_WORKERS.get(device, 1), cores()))


def keep_xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> int:
    """On a ``--dist loadgroup`` worker under pytest >= 9.2, give each grouped test the ``@group`` node-id
    suffix that pytest-xdist meant to add (the same names, joined as it joins them); the number fixed."""
    if not getattr(config.option, "loadgroup", False):  # set on pytest-xdist workers only
        return 0
    try:
        from _pytest.nodeid import NodeId  # pytest >= 9.2, where the suffix no longer sticks
    except ImportError:
        return 0
    fixed = 0
    for item in items:
        group = xdist_group_of(item)
        if group and not item.nodeid.endswith(f"@{group}"):
            item._id = NodeId.parse(f"{item.nodeid}@{group}")  # type: ignore[attr-defined]
            fixed += 1
    return fixed


def engine_group_scheduling(config: pytest.Config, log: Any, longest_first: Sequence[str]) -> Any | None:
    """The scheduler for ``--dist loadgroup`` (``None``: leave it to pytest-xdist)."""
    try:
        from xdist.scheduler import LoadGroupScheduling
    except ImportError:
        return None
    if not all(hasattr(LoadGroupScheduling, name) for name in ("_assign_work_unit", "_pending_of", "_reschedule")):
        return None
    rank = {group: i for i, group in enumerate(longest_first)}

    class EngineGroupScheduling(LoadGroupScheduling):  # type: ignore[misc,valid-type]
        def _assign_work_unit(self, node: Any) -> None:
            order = sorted(self.workqueue, key=lambda scope: (rank.get(scope, len(rank)), -len(self.workqueue[scope])))
            # A worker that must queue a group before it has finished a test (its group is one test,
            # e.g. an RL run) stays busy the longest: it queues the shortest group, and the longest
            # remaining ones wait for the workers that free up first.
            given = self.assigned_work.get(node) or {}
            waiting = bool(given) and not any(done for scope in given.values() for done in scope.values())
            self.workqueue.move_to_end(order[-1] if waiting else order[0], last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node: Any) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            # A worker runs a test only once it knows the next one (or that none comes): with one
            # test left it waits, so that is when it takes its next group, and not before.
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    return EngineGroupScheduling(config, log)
