"""Correlator (client side of request-reply) and ReplyCache (server side)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pigeon._core.rpc import CacheState, Correlator, ReplyCache, seconds_left


def started(
    corr: Correlator,
    rid: str,
    now: float = 0.0,
    timeout: float = 10.0,
    attempt_timeout: float = 3.0,
):
    return corr.start(rid, "svc", now, timeout=timeout, attempt_timeout=attempt_timeout)


# -- choose (Rule 1) -----------------------------------------------------------


def test_start_records_a_pending_call() -> None:
    corr = Correlator()
    call = started(corr, "r1", now=5.0, timeout=10.0, attempt_timeout=2.0)
    assert (call.request_id, call.service, call.deadline, call.attempt_timeout) == (
        "r1",
        "svc",
        15.0,
        2.0,
    )
    assert call.server is None and call.tried == []
    assert len(corr) == 1
    assert corr.next_wakeup() == 15.0


def test_choose_without_candidates_is_none_and_changes_nothing() -> None:
    corr = Correlator()
    call = started(corr, "r1")
    assert corr.choose(call, [], 0.0) is None
    assert call.server is None and call.tried == []
    assert corr.retries == 0


def test_choose_prefers_least_outstanding() -> None:
    corr = Correlator()
    for i in range(3):
        c = started(corr, f"busy-a{i}")
        assert corr.choose(c, ["A"], 0.0) == "A"
    c = started(corr, "busy-c")
    corr.choose(c, ["C"], 0.0)
    assert (corr.load("A"), corr.load("B"), corr.load("C")) == (3, 0, 1)
    call = started(corr, "r")
    assert corr.choose(call, ["A", "B", "C"], 0.0) == "B"
    assert corr.load("B") == 1


def test_choose_prefers_untried_even_when_busier() -> None:
    corr = Correlator()
    for i in range(5):
        corr.choose(started(corr, f"b{i}"), ["B"], 0.0)
    call = started(corr, "r")
    assert corr.choose(call, ["A"], 0.0) == "A"
    # A is idle but was tried already; B is busy but untried
    assert corr.choose(call, ["A", "B"], 1.0) == "B"
    assert call.tried == ["A", "B"]
    # once all are tried, load decides again
    assert corr.choose(call, ["A", "B"], 2.0) == "A"
    assert corr.retries == 2


def test_equally_loaded_servers_take_turns() -> None:
    corr = Correlator()
    chosen = []
    for i in range(6):
        call = started(corr, f"r{i}")
        chosen.append(corr.choose(call, ["A", "B", "C"], 0.0))
        corr.finish(call.request_id)
    assert Counter(chosen) == {"A": 2, "B": 2, "C": 2}


def test_assign_sets_attempt_deadline_capped_by_deadline() -> None:
    corr = Correlator()
    call = started(corr, "r", now=0.0, timeout=5.0, attempt_timeout=2.0)
    corr.choose(call, ["A"], 1.0)
    assert call.attempt_deadline == 3.0
    corr.choose(call, ["B"], 4.0)
    assert call.attempt_deadline == 5.0  # never past the call's deadline
    assert corr.next_wakeup() == 5.0


def test_reassigning_moves_the_load() -> None:
    corr = Correlator()
    call = started(corr, "r")
    corr.choose(call, ["A"], 0.0)
    assert (corr.load("A"), corr.load("B")) == (1, 0)
    corr.choose(call, ["B"], 1.0)
    assert (corr.load("A"), corr.load("B")) == (0, 1)
    assert call.server == "B" and call.tried == ["A", "B"] and corr.retries == 1


# -- finish, due, server_lost (Rules 2 and 3) ----------------------------------------


def test_finish_returns_the_call_and_frees_its_server() -> None:
    corr = Correlator()
    call = started(corr, "r")
    corr.choose(call, ["A"], 0.0)
    assert corr.finish("r") is call
    assert call.server is None
    assert corr.load("A") == 0 and len(corr) == 0
    assert corr.late_replies == 0
    assert corr.next_wakeup() is None


def test_finish_of_unknown_or_finished_id_counts_a_late_reply() -> None:
    corr = Correlator()
    corr.choose(started(corr, "r"), ["A"], 0.0)
    assert corr.finish("nope") is None
    assert corr.finish("r") is not None
    assert corr.finish("r") is None
    assert corr.late_replies == 2
    assert corr.load("A") == 0


def test_due_expires_at_the_deadline_and_not_before() -> None:
    corr = Correlator()
    call = started(corr, "r", now=0.0, timeout=5.0, attempt_timeout=10.0)
    corr.choose(call, ["A"], 0.0)
    assert corr.due(4.999) == ([], [])
    expired, retry = corr.due(5.0)
    assert expired == [call] and retry == []
    assert len(corr) == 0 and corr.load("A") == 0
    # a reply after the deadline is late
    assert corr.finish("r") is None and corr.late_replies == 1


def test_due_returns_timed_out_attempts_for_retry() -> None:
    corr = Correlator()
    call = started(corr, "r", now=0.0, timeout=10.0, attempt_timeout=3.0)
    unassigned = started(corr, "u", now=0.0, timeout=10.0, attempt_timeout=3.0)
    corr.choose(call, ["A"], 0.0)
    assert corr.next_wakeup() == 3.0
    assert corr.due(2.9) == ([], [])
    expired, retry = corr.due(3.0)
    assert expired == [] and retry == [call]
    assert len(corr) == 2  # still pending: the caller moves it
    assert corr.choose(call, ["A", "B"], 3.0) == "B"
    assert call.attempt_deadline == 6.0
    assert unassigned not in corr.due(9.0)[1]  # no server, no attempt to time out
    expired, _ = corr.due(10.0)
    assert {c.request_id for c in expired} == {"r", "u"}


def test_server_lost_returns_its_calls_only() -> None:
    corr = Correlator()
    on_a = [started(corr, f"a{i}") for i in range(3)]
    for c in on_a:
        corr.choose(c, ["A"], 0.0)
    on_b = started(corr, "b")
    corr.choose(on_b, ["B"], 0.0)
    lost = corr.server_lost("A")
    assert {c.request_id for c in lost} == {"a0", "a1", "a2"}
    assert all(c.server is None and c.tried == ["A"] for c in lost)
    assert corr.load("A") == 0 and corr.load("B") == 1
    assert len(corr) == 4  # lost calls are still pending, to be retried
    assert corr.server_lost("A") == []
    # the retry goes elsewhere, with the same request id
    assert corr.choose(lost[0], ["A", "C"], 1.0) == "C"
    assert corr.retries == 1


class CorrelatorMachine(RuleBasedStateMachine):
    """Load per server always equals the calls assigned to it."""

    @initialize()
    def setup(self) -> None:
        self.corr = Correlator()
        self.now = 0.0
        self.n = 0

    @rule(timeout=st.sampled_from([1.0, 4.0]), attempt=st.sampled_from([0.5, 2.0]))
    def start(self, timeout: float, attempt: float) -> None:
        self.corr.start(f"r{self.n}", "svc", self.now, timeout=timeout, attempt_timeout=attempt)
        self.n += 1

    @rule(i=st.integers(0, 30), servers=st.lists(st.sampled_from("ABC"), max_size=3, unique=True))
    def choose(self, i: int, servers: list[str]) -> None:
        calls = list(self.corr._calls.values())
        if not calls:
            return
        call = calls[i % len(calls)]
        untried = [s for s in servers if s not in call.tried]
        chosen = self.corr.choose(call, servers, self.now)
        if not servers:
            assert chosen is None
            return
        assert chosen in servers and call.server == chosen
        if untried:
            assert chosen in untried

    @rule(i=st.integers(0, 30))
    def finish(self, i: int) -> None:
        late = self.corr.late_replies
        rid = f"r{i}"
        pending = rid in self.corr._calls
        assert (self.corr.finish(rid) is not None) is pending
        assert self.corr.late_replies == late + (not pending)

    @rule(server=st.sampled_from("ABC"))
    def lose(self, server: str) -> None:
        before = {rid for rid, c in self.corr._calls.items() if c.server == server}
        lost = self.corr.server_lost(server)
        assert {c.request_id for c in lost} == before

    @rule(dt=st.sampled_from([0.25, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        wake = self.corr.next_wakeup()
        expired, retry = self.corr.due(self.now)
        assert all(c.deadline <= self.now for c in expired)
        assert all(c.attempt_deadline <= self.now < c.deadline for c in retry)
        if wake is None or wake > self.now:
            assert expired == [] and retry == []
        assert all(c.request_id not in self.corr._calls for c in expired)

    @invariant()
    def load_matches_assignments(self) -> None:
        counts = Counter(c.server for c in self.corr._calls.values() if c.server is not None)
        for server in "ABC":
            assert self.corr.load(server) == counts[server]


CorrelatorMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None
)
TestCorrelatorModel = CorrelatorMachine.TestCase


# -- ReplyCache (Rule 4) ------------------------------------------------------------


def test_cache_new_running_done() -> None:
    cache = ReplyCache(ttl=60.0)
    assert cache.begin("r", 0.0) == (CacheState.NEW, None)
    assert cache.begin("r", 1.0) == (CacheState.RUNNING, None)
    cache.finish("r", "the reply", 2.0)
    assert cache.begin("r", 3.0) == (CacheState.DONE, "the reply")
    assert cache.begin("r", 4.0) == (CacheState.DONE, "the reply")
    assert cache.hits == 3
    assert cache.begin("other", 4.0) == (CacheState.NEW, None)


def test_done_entries_are_pruned_after_ttl_from_finish() -> None:
    cache = ReplyCache(ttl=10.0)
    cache.begin("r", 0.0)
    cache.finish("r", "reply", 5.0)
    assert cache.begin("r", 15.0) == (CacheState.DONE, "reply")  # exactly ttl: kept
    assert cache.begin("r", 15.001) == (CacheState.NEW, None)


def test_running_entries_are_not_pruned_by_ttl() -> None:
    cache = ReplyCache(ttl=10.0)
    cache.begin("slow", 0.0)
    assert cache.begin("slow", 1000.0) == (CacheState.RUNNING, None)
    cache.finish("slow", "late answer", 1001.0)
    assert cache.begin("slow", 1002.0) == (CacheState.DONE, "late answer")


def test_ttl_prunes_oldest_first_and_keeps_fresh_ones() -> None:
    cache = ReplyCache(ttl=10.0)
    for i in range(5):
        cache.begin(f"r{i}", float(i))
        cache.finish(f"r{i}", i, float(i))
    # at t=13, r0..r2 are older than 10s
    assert cache.begin("r3", 13.0) == (CacheState.DONE, 3)
    assert cache.begin("r4", 13.0) == (CacheState.DONE, 4)
    assert cache.begin("r2", 13.0) == (CacheState.NEW, None)
    assert cache.begin("r0", 13.0) == (CacheState.NEW, None)


def test_max_entries_evicts_the_oldest() -> None:
    cache = ReplyCache(max_entries=3, ttl=1e9)
    for i in range(6):
        cache.begin(f"r{i}", float(i))
        cache.finish(f"r{i}", i, float(i))
    # the three most recent are remembered
    for i in (5, 4, 3):
        assert cache.begin(f"r{i}", 10.0) == (CacheState.DONE, i)
    assert cache.begin("r0", 10.0) == (CacheState.NEW, None)
    assert len(cache._entries) <= cache.max_entries + 1


def test_finish_moves_an_entry_to_the_young_end() -> None:
    cache = ReplyCache(max_entries=2, ttl=1e9)
    cache.begin("old", 0.0)
    cache.begin("mid", 1.0)
    cache.finish("old", "x", 2.0)  # "old" is now the youngest
    cache.begin("new", 3.0)
    # two entries fit: the two youngest, "old" and "new", are kept
    assert cache.begin("old", 5.0) == (CacheState.DONE, "x")
    assert cache.begin("new", 5.0) == (CacheState.RUNNING, None)
    assert cache.begin("mid", 5.0) == (CacheState.NEW, None)


@pytest.mark.parametrize("n", [1, 10, 50])
def test_cache_never_runs_a_fresh_id_twice(n: int) -> None:
    cache = ReplyCache(max_entries=100, ttl=30.0)
    runs = Counter()
    for t in range(n):
        for rid in (f"r{t}", f"r{max(0, t - 1)}"):
            state, _ = cache.begin(rid, float(t))
            if state is CacheState.NEW:
                runs[rid] += 1
                cache.finish(rid, rid.upper(), float(t))
    assert set(runs.values()) == {1}
    assert len(runs) == n


def test_seconds_left_trusts_the_earlier_of_deadline_and_time_left() -> None:
    # Clocks agree: the absolute deadline and the time left say the same.
    assert seconds_left(5.0, 105.0, 100.0) == 5.0
    # The request was read late (a frozen server): the deadline says so.
    assert seconds_left(5.0, 105.0, 103.0) == 2.0
    assert seconds_left(5.0, 105.0, 106.0) == -1.0
    # The receiver's clock is behind the sender's by an hour: "received +
    # seconds left" bounds it, so a skewed clock never stretches a deadline.
    assert seconds_left(5.0, 105.0 + 3600, 100.0) == 5.0
    # A peer that sends no absolute deadline: only the time left.
    assert seconds_left(5.0, None, 1e9) == 5.0
