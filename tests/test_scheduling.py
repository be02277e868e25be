"""The engine-group scheduler under pytest-xdist, driven with fake workers (a real -n 2 run is in test_vllm_cpu)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from pytest_rlparity.cpu_workers import cores
from pytest_rlparity.scheduling import auto_workers, engine_group_scheduling, without_group
from pytest_rlparity.suite import LONGEST_FIRST

pytest.importorskip("xdist")


class FakeWorker:
    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.received: list[list[int]] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.received.append(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def start(collection: list[str], workers: int):
    values = {"tx": [f"{workers}*popen"]}
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=True), getvalue=values.get)
    scheduler = engine_group_scheduling(config, None, LONGEST_FIRST)
    assert scheduler is not None
    nodes = [FakeWorker(f"gw{i}") for i in range(workers)]
    for node in nodes:
        scheduler.add_node(node)
        scheduler.add_node_collection(node, collection)
    scheduler.schedule()
    return scheduler, nodes


def groups_of(node: FakeWorker, collection: list[str]) -> list[str]:
    return [collection[batch[0]].rsplit("@", 1)[1] for batch in node.received]


SUITE = [
    *(f"test_semantic.py::test_{i}@session-engine" for i in range(15)),
    "test_inference_path.py::test_chunked@chunked-prefill-engine",
    "test_inference_path.py::test_runtime[async]@runtime-mode-engines",
    "test_inference_path.py::test_runtime[compiled]@runtime-mode-engines",
    "test_inference_path.py::test_lm_head@lm-head-engines",
    *(f"test_inference_path.py::test_update_{i}@path-engine" for i in range(4)),
    *(f"test_inference_path.py::test_in_flight[{mode}]@in-flight-engine" for mode in ("keep", "wait", "abort")),
    *(f"test_inference_path.py::test_transfer[{backend}]@transfer-engines" for backend in ("nccl", "ipc")),
    *(f"test_objective.py::test_rl[{loss}]@rl-engine-{loss}" for loss in ("gspo", "grpo", "ppo")),
]


def test_the_longest_groups_go_first_and_a_one_test_group_queues_the_shortest_left():
    _, nodes = start(SUITE, 4)
    assert [groups_of(n, SUITE) for n in nodes] == [
        ["in-flight-engine"],
        # A worker must know its next test before it runs its only one: the next group comes at once,
        # and it is the shortest, since this worker will be busy the longest.
        ["rl-engine-gspo", "transfer-engines"],
        ["rl-engine-grpo", "chunked-prefill-engine"],
        ["rl-engine-ppo", "session-engine"],
    ]


def test_a_worker_takes_the_longest_group_left_when_its_last_test_is_about_to_run():
    scheduler, nodes = start(SUITE, 4)
    in_flight = nodes[0]
    scheduler.mark_test_complete(in_flight, in_flight.received[0][0])
    assert groups_of(in_flight, SUITE) == ["in-flight-engine"]  # two tests left: no second engine queued behind them
    scheduler.mark_test_complete(in_flight, in_flight.received[0][1])
    assert groups_of(in_flight, SUITE) == ["in-flight-engine", "path-engine"]


def test_groups_it_does_not_know_follow_by_test_count():
    collection = [*SUITE, "mine.py::test_a@my-engine", "mine.py::test_b@my-engine", "mine.py::test_c@other-engine"]
    _, nodes = start(collection, 12)
    assert [groups_of(n, collection)[0] for n in nodes][-2:] == ["my-engine", "other-engine"]


def test_every_group_of_the_built_in_suite_has_its_place(pytester):
    items, _ = pytester.inline_genitems("--pyargs", "pytest_rlparity.suite", "-p", "no:cacheprovider")
    groups = {item.get_closest_marker("xdist_group").args[0] for item in items}
    assert len(items) > 30
    assert groups == set(LONGEST_FIRST)


def test_tests_of_one_xdist_group_run_in_one_worker(pytester):
    """pytest 9.2 ignores pytest-xdist 3.8's group suffix (pytest-xdist #1386); the plugin keeps it."""
    pytester.makepyfile(
        """
        import pytest, time

        @pytest.mark.xdist_group("one-engine")
        class TestShared:
            def test_a(self): time.sleep(0.3)
            def test_b(self): time.sleep(0.3)
            def test_c(self): time.sleep(0.3)

        def test_x(): time.sleep(0.3)
        def test_y(): time.sleep(0.3)
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    workers = {line.split()[0] for line in result.outlines if "PASSED" in line and "TestShared::" in line}
    assert len(workers) == 1, result.outlines
    assert sum("@one-engine" in line for line in result.outlines if "PASSED" in line) == 3


def test_a_parity_run_on_n_auto_groups_the_session_engine_tests_and_takes_the_measured_worker_count(pytester):
    """``pytest --rlparity -n auto`` alone: the measured worker count for the device, ``--dist loadgroup``,
    and tests on the session's engine that name no group in one group, so that engine starts once."""
    pytester.makeconftest("import pytest\n\n@pytest.fixture\ndef rlparity_engine():\n    return None\n")
    pytester.makepyfile(
        """
        import time

        def test_a(rlparity_engine): time.sleep(0.3)
        def test_b(rlparity_engine): time.sleep(0.3)
        def test_c(rlparity_engine): time.sleep(0.3)
        def test_x(): time.sleep(0.3)
        def test_y(): time.sleep(0.3)
        """
    )
    result = pytester.runpytest_subprocess("--rlparity", "-n", "auto", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    workers = auto_workers("cpu")
    result.stdout.fnmatch_lines([f"created: {workers}/{workers} worker*"])
    on_engine = [line for line in result.outlines if "PASSED" in line and "@session-engine" in line]
    assert len(on_engine) == 3 and len({line.split()[0] for line in on_engine}) == 1, result.outlines


def test_auto_workers_follow_the_measurements_and_never_exceed_the_cores(monkeypatch):
    assert auto_workers("cpu") == min(2, cores())
    assert auto_workers("cuda") == min(5, cores())
    assert auto_workers("unknown") == 1
    # A container held to one core of a larger host: one worker, not one per core of the host.
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert auto_workers("cpu") == auto_workers("cuda") == 1


def test_a_node_id_loses_its_group_suffix_and_keeps_an_at_sign_of_its_own():
    assert without_group("t.py::test_x[a]@session-engine") == "t.py::test_x[a]"
    assert without_group("t.py::test_x[a@b]") == "t.py::test_x[a@b]"
    assert without_group("t.py::test_y") == "t.py::test_y"
