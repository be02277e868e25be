"""Engine groups across pytest-xdist workers: the longest group first, one group at a time per worker.

Under ``pytest -n N --dist loadgroup`` every test's ``xdist_group`` names the engine configuration
it uses, so a group is a worker's engine start plus its checks. pytest-xdist hands out groups by
test count and queues another group on a worker while it still has two tests to run; a run then
ends with one worker starting the small groups' engines one after another while the others wait
(measured on an H100: five starts in a row on one of four workers). Here a worker gets its next
group only when its last test is about to run, and the groups the built-in suite knows to be long
go first (:data:`pytest_rlparity.suite.LONGEST_FIRST`); other groups follow, most tests first.

Relies on pytest-xdist's ``LoadGroupScheduling`` internals (3.x: ``workqueue``,
``_assign_work_unit``, ``_pending_of``); where they are missing, pytest-xdist schedules as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest


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
            first = min(self.workqueue, key=lambda scope: (rank.get(scope, len(rank)), -len(self.workqueue[scope])))
            self.workqueue.move_to_end(first, last=False)
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
