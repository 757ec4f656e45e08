"""The decisions of ``pigeon run``'s supervisor: restarts with backoff, drains
with a deadline, what ends it and with which code. No processes, no clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pigeon._core.supervise import (
    EXIT_CANNOT_LOAD,
    EXIT_CANNOT_LOAD_SUPERVISOR,
    EXIT_FORCED,
    KILL_MARGIN,
    Action,
    Exit,
    Kill,
    Restarting,
    RestartPolicy,
    SlotState,
    Start,
    Supervision,
    Terminate,
)
from pigeon.errors import ConfigurationError

POLICY = RestartPolicy(base_delay=1.0, max_delay=8.0, factor=2.0, stable_after=60.0)


def supervision(workers: int = 2, grace: float = 10.0, reload: bool = False) -> Supervision:
    return Supervision(workers, grace, reload_enabled=reload, policy=POLICY)


def test_every_slot_starts_at_once() -> None:
    assert supervision(3).start(0.0) == [Start(0), Start(1), Start(2)]


@pytest.mark.parametrize(
    ("crashes", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (500, 8.0)]
)
def test_restart_delay_grows_and_is_capped(crashes: int, delay: float) -> None:
    assert POLICY.delay(crashes) == delay


def test_a_crash_is_restarted_after_the_backoff() -> None:
    s = supervision(1)
    s.start(0.0)
    assert s.exited(0, -9, 1.0) == [Restarting(0, 1.0, 1)]
    assert s.state(0) is SlotState.BACKOFF
    assert s.next_due() == 2.0
    assert s.poll(1.9) == []
    assert s.poll(2.0) == [Start(0)]
    assert s.stats()["crashed"] == 1 and s.stats()["restarted"] == 1


def test_crashes_in_a_row_wait_longer_and_a_stable_run_starts_the_count_again() -> None:
    s = supervision(1)
    s.start(0.0)
    now = 0.0
    delays = []
    for _ in range(5):
        (restarting,) = s.exited(0, 1, now)
        assert isinstance(restarting, Restarting)
        delays.append(restarting.delay)
        now += restarting.delay
        assert s.poll(now) == [Start(0)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    now += POLICY.stable_after  # ran long enough: not a crash loop
    assert s.exited(0, 1, now) == [Restarting(0, 1.0, 1)]


def test_stop_drains_and_exits_0_when_every_process_exits_0() -> None:
    s = supervision(2, grace=10.0)
    s.start(0.0)
    assert s.stop(5.0) == [Terminate(0), Terminate(1)]
    assert s.next_due() == 5.0 + 10.0 + KILL_MARGIN
    assert s.exited(0, 0, 6.0) == []
    assert s.exited(1, 0, 7.0) == [Exit(0)]


def test_a_process_still_running_at_the_deadline_is_killed_and_the_exit_is_1() -> None:
    s = supervision(2, grace=10.0)
    s.start(0.0)
    s.stop(0.0)
    s.exited(0, 0, 1.0)
    assert s.poll(10.0 + KILL_MARGIN - 0.1) == []
    assert s.poll(10.0 + KILL_MARGIN) == [Kill(1)]
    assert s.poll(20.0 + KILL_MARGIN) == []  # killed once
    assert s.exited(1, -9, 16.0) == [Exit(1)]
    assert s.stats()["killed"] == 1


def test_a_second_stop_kills_everything_at_once() -> None:
    s = supervision(2)
    s.start(0.0)
    s.stop(0.0)
    assert s.stop(0.5) == [Kill(0), Kill(1)]
    s.exited(0, -9, 0.6)
    assert s.exited(1, -9, 0.6) == [Exit(EXIT_FORCED)]


def test_a_stop_cancels_due_restarts() -> None:
    s = supervision(2)
    s.start(0.0)
    s.exited(0, 1, 0.5)  # backing off
    assert s.stop(1.0) == [Terminate(1)]
    assert s.poll(100.0) == [Kill(1)]  # no Start(0)
    assert s.exited(1, -9, 100.0) == [Exit(1)]


def test_stop_with_nothing_running_exits_at_once() -> None:
    s = supervision(1)
    s.start(0.0)
    s.exited(0, 1, 0.1)
    assert s.stop(0.2) == [Exit(0)]


def test_a_process_that_cannot_load_the_app_stops_the_supervisor() -> None:
    s = supervision(2)
    s.start(0.0)
    assert s.exited(0, EXIT_CANNOT_LOAD, 0.1) == [Terminate(1)]
    assert s.state(0) is SlotState.FAILED
    assert s.poll(1000.0) == [Kill(1)]  # never restarted
    assert s.exited(1, 0, 1000.0) == [Exit(EXIT_CANNOT_LOAD_SUPERVISOR)]


def test_with_reload_a_slot_that_cannot_load_waits_for_the_next_change() -> None:
    s = supervision(1, reload=True)
    s.start(0.0)
    assert s.exited(0, EXIT_CANNOT_LOAD, 0.1) == []
    assert s.poll(1000.0) == [] and s.next_due() == math.inf
    assert s.reload(1001.0) == [Start(0)]


def test_a_change_while_a_process_was_failing_to_load_starts_it_again() -> None:
    s = supervision(1, reload=True)
    s.start(0.0)
    assert s.reload(1.0) == [Terminate(0)]  # the change is heard first
    assert s.exited(0, EXIT_CANNOT_LOAD, 1.1) == [Start(0)]  # then its failure
    assert s.exited(0, EXIT_CANNOT_LOAD, 2.0) == []  # no change since: waits
    assert s.state(0) is SlotState.FAILED


def test_reload_restarts_each_process_as_soon_as_it_exits() -> None:
    s = supervision(2, reload=True)
    s.start(0.0)
    assert s.reload(1.0) == [Terminate(0), Terminate(1)]
    assert s.exited(0, 0, 1.5) == [Start(0)]
    assert s.poll(1.0 + 10.0 + KILL_MARGIN) == [Kill(1)]
    assert s.exited(1, -9, 20.0) == [Start(1)]
    assert s.stats()["reloads"] == 1 and s.stats()["running"] == 2
    # A crash during the reload's drain is not held against the final exit.
    assert s.stop(30.0) == [Terminate(0), Terminate(1)]
    s.exited(0, 0, 31.0)
    assert s.exited(1, 0, 31.0) == [Exit(0)]


def test_a_stop_during_a_reload_does_not_restart() -> None:
    s = supervision(1, reload=True)
    s.start(0.0)
    s.reload(1.0)
    assert s.stop(1.1) == []  # already told to stop
    assert s.exited(0, 0, 2.0) == [Exit(0)]


def test_an_exit_heard_twice_changes_nothing() -> None:
    s = supervision(1)
    s.start(0.0)
    s.exited(0, 1, 0.1)
    assert s.exited(0, 1, 0.2) == []
    assert s.stats()["crashed"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"base_delay": -1.0}, {"max_delay": math.nan}, {"factor": 0.5}, {"factor": math.inf}],
)
def test_a_bad_restart_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RestartPolicy(**kwargs)


@pytest.mark.parametrize(("workers", "grace"), [(0, 1.0), (True, 1.0), (1, -1.0), (1, math.inf)])
def test_bad_numbers_are_refused(workers: int, grace: float) -> None:
    with pytest.raises(ConfigurationError):
        Supervision(workers, grace)


class SupervisorMachine(RuleBasedStateMachine):
    """Any order of exits, stops, reloads and time passing: processes are only
    started while running, each is killed at most once per start, the exit
    comes once and only when nothing runs, and a drain never outlives its
    deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.s = Supervision(3, 5.0, reload_enabled=True, policy=POLICY)
        self.alive = [False] * 3
        self.exit: int | None = None
        self.apply(self.s.start(self.now))

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            assert self.exit is None, f"{action} after the exit"
            if isinstance(action, Start):
                assert not self.s.stopping
                assert not self.alive[action.slot]
                self.alive[action.slot] = True
            elif isinstance(action, (Terminate, Kill)):
                assert self.alive[action.slot]
            elif isinstance(action, Exit):
                assert not any(self.alive)
                self.exit = action.code

    @rule(slot=st.integers(0, 2), code=st.sampled_from([0, 1, -9, EXIT_CANNOT_LOAD]))
    def process_exits(self, slot: int, code: int) -> None:
        if self.alive[slot]:
            self.alive[slot] = False
            self.apply(self.s.exited(slot, code, self.now))

    @rule(seconds=st.floats(0, 40))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.s.poll(self.now))

    @precondition(lambda self: self.exit is None)
    @rule()
    def stop(self) -> None:
        self.apply(self.s.stop(self.now))

    @precondition(lambda self: self.exit is None)
    @rule()
    def reload(self) -> None:
        self.apply(self.s.reload(self.now))

    @invariant()
    def nothing_planned_is_overdue(self) -> None:
        assert self.s.next_due() > self.now or self.s.poll(self.now) == []

    @invariant()
    def stopped_means_exited_once_nothing_runs(self) -> None:
        if self.s.stopping and not any(self.alive):
            assert self.exit is not None


TestSupervisorMachine = SupervisorMachine.TestCase
