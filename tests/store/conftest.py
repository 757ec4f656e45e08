"""Fixtures shared by the store tests: a fake clock and an opener per store kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pigeon.message import Message
from pigeon.store import MemoryStore, SqliteStore

T0 = 1_700_000_000.0


class FakeClock:
    """A wall clock that only moves when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Opener:
    """Opens stores of one kind; ``reopen`` closes and reopens durable ones."""

    def __init__(self, kind: str, directory: Path, clock: FakeClock) -> None:
        self.kind = kind
        self.durable = kind == "sqlite"
        self.path = directory / "queue.db"
        self.clock = clock
        self.opened: list[MemoryStore | SqliteStore] = []

    def open(self, **options: float) -> MemoryStore | SqliteStore:
        store: MemoryStore | SqliteStore
        if self.kind == "memory":
            store = MemoryStore(clock=self.clock, **options)
        else:
            store = SqliteStore(self.path, clock=self.clock, **options)
        self.opened.append(store)
        return store

    def reopen(
        self, store: MemoryStore | SqliteStore, **options: float
    ) -> MemoryStore | SqliteStore:
        if not self.durable:
            return store  # nothing to reopen: memory keeps its state while open
        store.close()
        return self.open(**options)

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
def opener(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    opener = Opener(request.param, tmp_path, clock)
    yield opener
    opener.close_all()


@pytest.fixture
def store(opener: Opener) -> MemoryStore | SqliteStore:
    return opener.open()


def msg(id: str, body: bytes = b"body", **fields: object) -> Message:
    """A message with a fixed id, for readable tests."""
    return Message(id=id, body=body, **fields)  # type: ignore[arg-type]
