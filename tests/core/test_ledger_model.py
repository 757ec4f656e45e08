"""QueueLedger against a plain model, driven by Hypothesis.

The machine puts, subscribes, dispatches, settles (rightly and wrongly),
advances the clock and expires, and after every step checks the ledger's
promises: a message is in exactly one place, never delivered after its ack,
attempts only grow, the first delivery is the only unflagged one, credit is
never exceeded, and the counters tell the truth.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pigeon._core.ledger import QueueLedger
from pigeon._core.limits import message_size
from pigeon.message import Message

LEASE_TTL = 4.0
MAX_ATTEMPTS = 3
IDS = [f"m{i}" for i in range(8)]
CONSUMERS = ["A", "B", "C"]


class LedgerMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.ledger = QueueLedger("q", lease_ttl=LEASE_TTL, max_attempts=MAX_ATTEMPTS)
        self.now = 0.0
        # model
        self.state: dict[str, str] = {}  # id -> ready|delayed|in_flight|acked|dead
        self.due: dict[str, float] = {}  # delayed id -> due time
        self.lease: dict[str, tuple[str, float]] = {}  # id -> (consumer, expires_at)
        self.attempts: dict[str, int] = {}
        self.deliveries: Counter[str] = Counter()
        self.prefetch: dict[str, int] = {}
        self.stats: Counter[str] = Counter()

    # -- helpers -----------------------------------------------------------

    def _held_by(self, consumer: str) -> list[str]:
        return [mid for mid, (c, _) in self.lease.items() if c == consumer]

    def _to_ready(self, mid: str) -> None:
        self.lease.pop(mid, None)
        self.state[mid] = "ready"

    def _pick(self, data: st.DataObject, wrong: bool) -> tuple[str, str]:
        mid = data.draw(st.sampled_from(sorted(self.lease)))
        holder = self.lease[mid][0]
        if wrong:
            others = [c for c in CONSUMERS if c != holder]
            return mid, data.draw(st.sampled_from(others))
        return mid, holder

    def _settle_ok(self, mid: str, consumer: str) -> bool:
        held = self.lease.get(mid)
        if held is None or held[0] != consumer:
            self.stats["stale_settles"] += 1
            return False
        del self.lease[mid]
        return True

    # -- producers -----------------------------------------------------------

    @rule(mid=st.sampled_from(IDS))
    def put(self, mid: str) -> None:
        added = self.ledger.put(Message(mid, mid.encode()))
        assert added is (mid not in self.state)
        if added:
            self.state[mid] = "ready"
            self.attempts[mid] = 0
            self.stats["received"] += 1
        else:
            self.stats["duplicates"] += 1

    # -- consumers -----------------------------------------------------------

    @rule(consumer=st.sampled_from(CONSUMERS), prefetch=st.integers(1, 3))
    def add_consumer(self, consumer: str, prefetch: int) -> None:
        if consumer in self.prefetch:
            # re-subscribing never lowers prefetch below what it holds
            prefetch = max(prefetch, len(self._held_by(consumer)))
        self.ledger.add_consumer(consumer, prefetch)
        self.prefetch[consumer] = prefetch

    @rule(consumer=st.sampled_from(CONSUMERS), lost=st.booleans())
    def remove_consumer(self, consumer: str, lost: bool) -> None:
        returned = self.ledger.remove_consumer(consumer, lost=lost)
        if consumer not in self.prefetch:
            assert returned == 0
            return
        held = self._held_by(consumer)
        assert returned == len(held)
        for mid in held:
            self._to_ready(mid)
        del self.prefetch[consumer]
        if lost:
            self.stats["consumers_lost"] += 1

    # -- dispatch -------------------------------------------------------------

    @rule()
    def dispatch(self) -> None:
        for mid, at in list(self.due.items()):
            if at <= self.now:
                del self.due[mid]
                self.state[mid] = "ready"
        batches, dead = self.ledger.dispatch(self.now)
        seen_consumers = set()
        for consumer, messages in batches:
            assert consumer in self.prefetch
            assert consumer not in seen_consumers
            seen_consumers.add(consumer)
            assert messages
            for m in messages:
                assert self.state[m.id] == "ready", (m.id, self.state[m.id])
                assert m.attempt == self.attempts[m.id] + 1
                assert self.attempts[m.id] < MAX_ATTEMPTS
                # Rule 2: flagged exactly when it was handed out before
                assert m.redelivered is (self.deliveries[m.id] > 0)
                self.deliveries[m.id] += 1
                self.attempts[m.id] = m.attempt
                self.state[m.id] = "in_flight"
                self.lease[m.id] = (consumer, self.now + LEASE_TTL)
                self.stats["delivered"] += 1
                self.stats["redelivered"] += m.redelivered
        for m in dead:
            assert self.state[m.id] == "ready"
            assert self.attempts[m.id] >= MAX_ATTEMPTS
            assert m.headers["x-pigeon-attempts"] == str(self.attempts[m.id])
            assert m.headers["x-pigeon-dead-queue"] == "q"
            assert "x-pigeon-dead-reason" in m.headers
            self.state[m.id] = "dead"
            self.stats["dead_lettered"] += 1
        # work-conserving: either nothing is ready or nobody has credit
        ready = [mid for mid, s in self.state.items() if s == "ready"]
        credit = sum(p - len(self._held_by(c)) for c, p in self.prefetch.items())
        assert not ready or credit == 0

    # -- settling -------------------------------------------------------------

    @precondition(lambda self: self.lease)
    @rule(data=st.data(), wrong=st.booleans())
    def ack(self, data: st.DataObject, wrong: bool) -> None:
        mid, consumer = self._pick(data, wrong)
        ok = self._settle_ok(mid, consumer)
        assert self.ledger.ack(mid, consumer) is ok
        if ok:
            self.state[mid] = "acked"
            self.stats["acked"] += 1

    @precondition(lambda self: self.lease)
    @rule(data=st.data(), wrong=st.booleans(), delay=st.sampled_from([0.0, 0.0, 1.5, 6.0]))
    def nack(self, data: st.DataObject, wrong: bool, delay: float) -> None:
        mid, consumer = self._pick(data, wrong)
        ok = self._settle_ok(mid, consumer)
        out = self.ledger.nack(mid, consumer, self.now, delay=delay, reason="boom" if delay else "")
        assert (out is not None) is ok
        if ok:
            assert out is not None and out.id == mid and out.redelivered
            self.stats["nacked"] += 1
            if delay > 0:
                self.state[mid] = "delayed"
                self.due[mid] = self.now + delay
            else:
                self.state[mid] = "ready"

    @precondition(lambda self: self.lease)
    @rule(data=st.data(), wrong=st.booleans())
    def reject(self, data: st.DataObject, wrong: bool) -> None:
        mid, consumer = self._pick(data, wrong)
        ok = self._settle_ok(mid, consumer)
        out = self.ledger.reject(mid, consumer, "bad")
        assert (out is not None) is ok
        if ok:
            assert out is not None and out.headers["x-pigeon-dead-reason"] == "bad"
            self.state[mid] = "dead"
            self.stats["dead_lettered"] += 1

    @precondition(lambda self: self.lease)
    @rule(data=st.data(), wrong=st.booleans())
    def extend(self, data: st.DataObject, wrong: bool) -> None:
        mid, consumer = self._pick(data, wrong)
        held = self.lease.get(mid)
        ok = held is not None and held[0] == consumer
        assert self.ledger.extend(mid, consumer, self.now) is ok
        if ok:
            self.lease[mid] = (consumer, self.now + LEASE_TTL)
        else:
            self.stats["stale_settles"] += 1

    @rule(mid=st.sampled_from(IDS), consumer=st.sampled_from(CONSUMERS))
    def settle_anything(self, mid: str, consumer: str) -> None:
        """An ack for whatever id, held or not (late, duplicate, never sent)."""
        ok = self._settle_ok(mid, consumer)
        assert self.ledger.ack(mid, consumer) is ok
        if ok:
            self.state[mid] = "acked"
            self.stats["acked"] += 1

    # -- time --------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0]))
    def advance_and_expire(self, dt: float) -> None:
        self.now += dt
        due = [mid for mid, (_, at) in self.lease.items() if at <= self.now]
        assert self.ledger.expire(self.now) == len(due)
        for mid in due:
            self._to_ready(mid)
        self.stats["expired"] += len(due)

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def every_message_is_in_exactly_one_place(self) -> None:
        led = self.ledger
        ready = [m.id for m in led._ready]
        delayed = [entry[2].id for entry in led._delayed]
        in_flight = list(led._leases)
        places = ready + delayed + in_flight
        assert len(places) == len(set(places)), "a message is in two places"
        for mid, s in self.state.items():
            where = (
                "ready"
                if mid in ready
                else "delayed"
                if mid in delayed
                else "in_flight"
                if mid in in_flight
                else None
            )
            if s in ("acked", "dead"):
                assert where is None, (mid, s, where)
            elif s == "delayed":
                assert where == "delayed", (mid, s, where)
            else:
                assert where == s, (mid, s, where)
        assert set(places) <= set(self.state)
        assert (led.ready_count, led.delayed_count, led.in_flight_count) == (
            len(ready),
            len(delayed),
            len(in_flight),
        )

    @invariant()
    def bytes_held_are_the_bodies_held(self) -> None:
        led = self.ledger
        held = [
            *led._ready,
            *(e[2] for e in led._delayed),
            *(le.message for le in led._leases.values()),
        ]
        assert led.bytes_held == sum(message_size(m.body, m.headers) for m in held)

    @invariant()
    def leases_match_the_model(self) -> None:
        for mid, lease in self.ledger._leases.items():
            assert (lease.consumer, lease.expires_at) == self.lease[mid]
            assert lease.message.attempt == self.attempts[mid]

    @invariant()
    def credit_is_never_exceeded(self) -> None:
        assert self.ledger.consumer_count == len(self.prefetch)
        for consumer, prefetch in self.prefetch.items():
            held = len(self._held_by(consumer))
            assert held <= prefetch
            assert self.ledger._consumers[consumer].unsettled == held

    @invariant()
    def attempts_never_decrease(self) -> None:
        led = self.ledger
        live = [
            *led._ready,
            *(e[2] for e in led._delayed),
            *(lease.message for lease in led._leases.values()),
        ]
        for m in live:
            assert m.attempt == self.attempts[m.id] == self.deliveries[m.id]

    @invariant()
    def counters_tell_the_truth(self) -> None:
        stats = self.ledger.stats.as_dict()
        assert stats == {k: self.stats[k] for k in stats}, (stats, dict(self.stats))
        assert stats["delivered"] - stats["redelivered"] == sum(
            1 for n in self.deliveries.values() if n > 0
        )

    @invariant()
    def next_wakeup_is_the_earliest_timer(self) -> None:
        times = [at for _, at in self.lease.values()]
        times += list(self.due.values())
        assert self.ledger.next_wakeup() == (min(times) if times else None)


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLedgerModel = LedgerMachine.TestCase
