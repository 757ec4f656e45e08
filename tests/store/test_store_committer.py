"""GroupCommitter: batching, confirms after commit, failure, close."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from pigeon.errors import ClosedError, ConfigurationError, StoreError, Timeout
from pigeon.store import Ack, GroupCommitter, MemoryStore, Op, Put, SqliteStore

from .conftest import msg


class RecordingStore(MemoryStore):
    """A memory store that remembers the size of every batch it applied."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def apply(self, ops: Sequence[Op]) -> list[bool]:
        self.gate.wait(10)  # lets a test hold the writer inside a commit
        self.batches.append(len(ops))
        return super().apply(ops)


class FailingStore(RecordingStore):
    def apply(self, ops: Sequence[Op]) -> list[bool]:
        raise StoreError("disk on fire", path="/x.db")


class BuggyStore(RecordingStore):
    def apply(self, ops: Sequence[Op]) -> list[bool]:
        raise KeyError("a bug")


def puts(n: int, prefix: str = "m") -> list[Put]:
    return [Put("q", msg(f"{prefix}{i}")) for i in range(n)]


def test_submit_returns_the_op_result_after_commit():
    store = RecordingStore()

    async def main():
        async with GroupCommitter(store) as committer:
            assert await committer.submit(Put("q", msg("a"))) is True
            # committed before the confirm: the store already holds it
            assert [s.message.id for s in store.load()] == ["a"]
            assert await committer.submit(Put("q", msg("a"))) is False
            assert await committer.submit_many([Ack("q", "a"), Ack("q", "a")]) == [True, False]
            assert await committer.submit_many([]) == []

    asyncio.run(main())


def test_concurrent_submits_share_batches_up_to_max_batch():
    store = RecordingStore()

    async def main():
        async with GroupCommitter(store, max_batch=64) as committer:
            store.gate.clear()  # hold the writer so submits pile up
            first = asyncio.ensure_future(committer.submit(Put("q", msg("first"))))
            tasks = [asyncio.ensure_future(committer.submit(op)) for op in puts(500)]
            await asyncio.sleep(0)  # let every task enqueue its op
            store.gate.set()
            assert await first is True
            assert await asyncio.gather(*tasks) == [True] * 500

    asyncio.run(main())
    assert sum(store.batches) == 501
    assert max(store.batches) == 64
    assert len(store.batches) <= 1 + (500 + 63) // 64
    assert [s.message.id for s in store.load()] == ["first"] + [f"m{i}" for i in range(500)]


def test_submit_many_is_never_split():
    store = RecordingStore()

    async def main():
        async with GroupCommitter(store, max_batch=10) as committer:
            assert await committer.submit_many(puts(25)) == [True] * 25

    asyncio.run(main())
    assert store.batches == [25]


def test_a_failed_batch_fails_its_callers_and_every_later_submit():
    store = FailingStore()

    async def main():
        committer = GroupCommitter(store)
        try:
            results = await asyncio.gather(
                *(committer.submit(op) for op in puts(20)), return_exceptions=True
            )
            assert all(isinstance(r, StoreError) for r in results)
            assert "disk on fire" in str(results[0])
            assert results[0].path == "/x.db"
            assert results[0] is not results[1]
            with pytest.raises(StoreError, match="refuses writes"):
                await committer.submit(Put("q", msg("later")))
        finally:
            await committer.aclose()

    asyncio.run(main())


def test_disk_full_through_the_committer(tmp_path):
    path = tmp_path / "q.db"

    async def main(store):
        async with GroupCommitter(store) as committer:
            assert await committer.submit_many(puts(5, "kept")) == [True] * 5
            pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
            store._conn.execute(f"PRAGMA max_page_count = {pages}")
            big = [Put("q", msg(f"big{i}", b"x" * 2000)) for i in range(100)]
            with pytest.raises(StoreError, match="full"):
                await committer.submit_many(big)
            with pytest.raises(StoreError):
                await committer.submit(Put("q", msg("small")))

    with SqliteStore(path) as store:
        asyncio.run(main(store))
    with SqliteStore(path) as store:
        assert len(store.load()) == 5


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unexpected_error_in_apply_never_leaves_a_caller_waiting():
    async def main():
        committer = GroupCommitter(BuggyStore())
        try:
            with pytest.raises(StoreError, match="unexpectedly"):
                await committer.submit(Put("q", msg("a")))
            with pytest.raises(StoreError):
                await committer.submit(Put("q", msg("b")))
        finally:
            await committer.aclose()

    asyncio.run(main())


def test_close_commits_everything_pending_first():
    store = RecordingStore()

    async def main():
        committer = GroupCommitter(store, max_batch=7)
        store.gate.clear()
        tasks = [asyncio.ensure_future(committer.submit(op)) for op in puts(100)]
        await asyncio.sleep(0)
        store.gate.set()
        await committer.aclose()
        assert await asyncio.gather(*tasks) == [True] * 100
        with pytest.raises(ClosedError):
            await committer.submit(Put("q", msg("late")))
        committer.close()  # twice is fine

    asyncio.run(main())
    assert len(store.load()) == 100


def test_close_gives_up_on_a_stuck_commit_instead_of_hanging():
    store = RecordingStore()

    async def main():
        committer = GroupCommitter(store)
        store.gate.clear()
        task = asyncio.ensure_future(committer.submit(Put("q", msg("a"))))
        await asyncio.sleep(0)
        with pytest.raises(Timeout):
            committer.close(timeout=0.05)
        store.gate.set()
        await committer.aclose()
        assert await task is True

    asyncio.run(main())


def test_a_cancelled_caller_does_not_disturb_the_others():
    store = RecordingStore()

    async def main():
        async with GroupCommitter(store) as committer:
            store.gate.clear()
            doomed = asyncio.ensure_future(committer.submit(Put("q", msg("a"))))
            other = asyncio.ensure_future(committer.submit(Put("q", msg("b"))))
            await asyncio.sleep(0)
            doomed.cancel()
            store.gate.set()
            assert await other is True
            with pytest.raises(asyncio.CancelledError):
                await doomed

    asyncio.run(main())
    # cancelling does not withdraw an op already handed to the writer
    assert {s.message.id for s in store.load()} == {"a", "b"}


def test_bad_arguments():
    store = MemoryStore()
    with pytest.raises(ConfigurationError):
        GroupCommitter(store, max_batch=0)

    async def main():
        with GroupCommitter(store) as committer:
            with pytest.raises(TypeError):
                await committer.submit("not an op")  # type: ignore[arg-type]

    asyncio.run(main())
