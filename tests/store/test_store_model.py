"""Hypothesis: random op sequences (with reopens and clock jumps) against a plain model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from pigeon.message import Message
from pigeon.store import Ack, Dead, DeadLetter, Put, Replay, Requeue, StoredMessage

from .conftest import T0, FakeClock, Opener

WINDOW = 120.0
queues = st.sampled_from(["a", "b"])
ids = st.sampled_from(["1", "2", "3", "4"])
messages = st.builds(
    Message,
    id=ids,
    body=st.binary(max_size=8),
    headers=st.dictionaries(st.sampled_from(["h", "x-pigeon-error"]), st.text(max_size=3)),
    attempt=st.integers(0, 5),
)
ops = st.one_of(
    st.builds(Put, queues, messages),
    st.builds(Ack, queues, ids),
    st.builds(Requeue, queues, messages, st.floats(T0, T0 + 1e4)),
    st.builds(Dead, queues, messages, st.text(max_size=5)),
    st.builds(Replay, queues, ids),
)


class Model:
    """What a store must hold: three ordered dicts, no cleverness."""

    def __init__(self) -> None:
        self.live: dict[tuple[str, str], tuple[Message, float]] = {}
        self.dead: dict[tuple[str, str], tuple[Message, str, float]] = {}
        self.acked: dict[tuple[str, str], float] = {}

    def apply(self, op, now: float) -> bool:
        if isinstance(op, Put):
            key = (op.queue, op.message.id)
            recently_acked = now - self.acked.get(key, -1e18) <= WINDOW
            if key in self.live or key in self.dead or recently_acked:
                return False
            self.live[key] = (op.message, 0.0)
            return True
        key = (op.queue, op.message.id if hasattr(op, "message") else op.id)
        if isinstance(op, Replay):
            if key not in self.dead:
                return False
            message = self.dead.pop(key)[0]
            self.live[key] = (msgspec.structs.replace(message, attempt=0), 0.0)
            return True
        if key not in self.live:
            return False
        if isinstance(op, Ack):
            del self.live[key]
            self.acked[key] = now
        elif isinstance(op, Requeue):
            self.live[key] = (op.message, op.ready_at)
        else:
            del self.live[key]
            self.dead[key] = (op.message, op.reason, now)
        return True


def machine_for(kind: str, directory: Path) -> type[RuleBasedStateMachine]:
    class StoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.clock = FakeClock()
            self.opener = Opener(kind, Path(tempfile.mkdtemp(dir=directory)), self.clock)
            self.store = self.opener.open()
            self.model = Model()

        @rule(batch=st.lists(ops, min_size=1, max_size=4))
        def apply(self, batch):
            expected = [self.model.apply(op, self.clock.now) for op in batch]
            assert self.store.apply(batch) == expected

        @rule(seconds=st.sampled_from([1.0, 61.0, 119.0, 121.0]))
        def advance_clock(self, seconds):
            self.clock.advance(seconds)

        @rule()
        def reopen(self):
            self.store = self.opener.reopen(self.store)

        @invariant()
        def store_matches_model(self):
            live = [StoredMessage(q, m, r) for (q, _), (m, r) in self.model.live.items()]
            dead = [DeadLetter(q, m, why, t) for (q, _), (m, why, t) in self.model.dead.items()]
            assert self.store.load() == live
            assert self.store.dead_letters() == dead
            counts: dict[str, dict[str, int]] = {}
            for kind_, table in (("ready", live), ("dead", dead)):
                for entry in table:
                    counts.setdefault(entry.queue, {"ready": 0, "dead": 0})[kind_] += 1
            assert self.store.counts() == counts

        def teardown(self) -> None:
            self.opener.close_all()

    return StoreMachine


@pytest.mark.timeout(40)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_store_follows_the_model(kind, tmp_path):
    run_state_machine_as_test(
        machine_for(kind, tmp_path),
        settings=settings(max_examples=60, stateful_step_count=25, deadline=None, database=None),
    )
