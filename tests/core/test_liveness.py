"""Liveness: peers are alive while heard from within the grace, reaped once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon._core.liveness import Liveness, OwnStalls


def test_grace_is_interval_times_misses() -> None:
    assert Liveness().grace == 3.0
    assert Liveness(interval=0.5, misses=4).grace == 2.0


def test_heard_reports_new_and_returning_peers() -> None:
    live = Liveness(interval=1.0, misses=3)
    assert live.heard("a", 0.0) is True
    assert live.heard("a", 1.0) is False
    assert live.heard("b", 1.0) is True
    assert sorted(live.peers()) == ["a", "b"]
    live.forget("a")
    assert live.peers() == ["b"]
    assert live.heard("a", 2.0) is True  # back after being forgotten
    live.forget("never-seen")  # no error
    assert sorted(live.peers()) == ["a", "b"]


def test_alive_until_the_grace_ends_inclusive() -> None:
    live = Liveness(interval=1.0, misses=3)
    assert not live.is_alive("a", 0.0)
    live.heard("a", 10.0)
    assert live.is_alive("a", 10.0)
    assert live.is_alive("a", 13.0)
    assert not live.is_alive("a", 13.001)
    live.heard("a", 13.0)  # any frame counts (Rule 1)
    assert live.is_alive("a", 16.0)


def test_reap_reports_each_dead_peer_exactly_once() -> None:
    live = Liveness(interval=1.0, misses=2)
    live.heard("a", 0.0)
    live.heard("b", 1.0)
    assert live.reap(2.0) == []  # a is exactly at the grace
    assert live.reap(2.5) == ["a"]
    assert live.reap(2.6) == []
    assert live.reap(10.0) == ["b"]
    assert live.reap(20.0) == []
    assert live.peers() == []
    assert live.heard("a", 21.0) is True  # back: reported as new again
    assert live.reap(23.5) == ["a"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 3, allow_nan=False)), max_size=30),
    st.floats(0.1, 2, allow_nan=False),
    st.integers(1, 4),
)
def test_reap_agrees_with_is_alive(
    events: list[tuple[str, float]], interval: float, misses: int
) -> None:
    live = Liveness(interval=interval, misses=misses)
    now = 0.0
    reported: set[str] = set()  # reported dead and not heard from since
    for peer, dt in events:
        now += dt
        alive_before = {p: live.is_alive(p, now) for p in live.peers()}
        dead = live.reap(now)
        assert sorted(dead) == sorted(p for p, alive in alive_before.items() if not alive)
        assert all(live.is_alive(p, now) for p in live.peers())
        assert not reported & set(dead), "a dead peer was reported twice"
        reported |= set(dead)
        assert live.heard(peer, now) is (peer not in alive_before or not alive_before[peer])
        reported.discard(peer)
        assert live.is_alive(peer, now)


def test_a_peer_that_beats_slower_is_given_its_own_grace() -> None:
    # Rule 3: a node beating every 0.3 s keeps a peer that beats every 1 s.
    live = Liveness(interval=0.3, misses=3)
    live.heard("slow", 0.0, interval=1.0)
    assert live.is_alive("slow", 2.9)
    assert live.reap(2.9) == []
    assert live.reap(3.01) == ["slow"]


def test_a_claimed_interval_is_capped_and_never_shortens_ours() -> None:
    from pigeon._core.liveness import MAX_PEER_HEARTBEAT, peer_grace

    assert peer_grace(1.0, 1e9, 3) == MAX_PEER_HEARTBEAT * 3
    assert peer_grace(1.0, 0.1, 3) == 3.0  # never stricter than our own rule
    assert peer_grace(1.0, 0.0, 3) == 3.0  # not said (a peer of 0.1)
    live = Liveness(interval=1.0, misses=3)
    live.heard("liar", 0.0, interval=1e9)
    assert live.reap(MAX_PEER_HEARTBEAT * 3 + 1) == ["liar"]
    live.heard("back", 0.0, interval=5.0)
    live.heard("back", 1.0, interval=0.0)  # says nothing now: our own rule again
    assert live.reap(4.01) == ["back"]


def test_a_check_on_time_or_a_little_late_excuses_nothing() -> None:
    stalls = OwnStalls(interval=1.0)
    assert stalls.tick(100.0) == 0.0  # the first check has nothing to compare with
    assert stalls.tick(101.0) == 0.0
    assert stalls.tick(103.0) == 0.0  # late by one interval: ordinary jitter
    assert (stalls.stalls, stalls.excused) == (0, 0.0)


def test_a_late_check_excuses_the_time_past_one_interval_and_counts_it() -> None:
    stalls = OwnStalls(interval=1.0)
    stalls.tick(100.0)
    assert stalls.tick(106.0) == 5.0
    assert stalls.tick(107.0) == 0.0  # measured from the late check
    assert (stalls.stalls, stalls.excused) == (1, 5.0)


def test_an_excused_stall_keeps_live_peers_and_delays_a_dead_ones_reaping() -> None:
    live = Liveness(interval=1.0, misses=3)
    stalls = OwnStalls(interval=1.0)
    live.heard("quiet", 100.0)  # says nothing more
    live.heard("beating", 100.0)  # beats on, but its frames wait unread
    stalls.tick(100.0)
    live.heard("read-first", 109.5)  # read in the turn the loop came back, before the check
    now = 110.0  # the loop was held up ten seconds
    live.excuse(stalls.tick(now), now)
    assert live.reap(now) == []  # nobody is taken for dead for our stall
    live.heard("beating", 110.0)  # its waiting frames are read
    assert live.reap(112.0) == []
    assert live.reap(112.001) == ["quiet"]  # 100 + 9 excused + 3 of grace
    live.heard("beating", 112.5)
    # The one read after the stall is not excused it again: its life counts
    # from 110 at the latest, not 109.5 + 9.
    assert live.reap(113.001) == ["read-first"]
