"""GroupCommitter: batching, confirms after commit, failure, close."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from pigeon.errors import ClosedError, ConfigurationError, StoreError, Timeout
from pigeon.store import Ack, GroupCommitter, MemoryStore, Op, Put, Requeue, SqliteStore

from .conftest import msg


class RecordingStore(MemoryStore):
    """A memory store that remembers the size of every batch it applied."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def apply_many(self, requests: Sequence[Sequence[Op]]) -> list[list[bool] | StoreError]:
        self.gate.wait(10)  # lets a test hold the writer inside a commit
        self.batches.append(sum(len(ops) for ops in requests))
        return super().apply_many(requests)


class FailingStore(RecordingStore):
    """Fails ``failures`` batches, then works."""

    def __init__(self, failures: int = 1_000_000) -> None:
        super().__init__()
        self.failures = failures

    def apply_many(self, requests: Sequence[Sequence[Op]]) -> list[list[bool] | StoreError]:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("disk on fire", path="/x.db")
        return super().apply_many(requests)


class BuggyStore(RecordingStore):
    def __init__(self, failures: int = 1_000_000, error: BaseException | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.error = error or KeyError("a bug")

    def apply_many(self, requests: Sequence[Sequence[Op]]) -> list[list[bool] | StoreError]:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return super().apply_many(requests)


class ShortStore(RecordingStore):
    """Answers one request too few: a broken store must not leave callers waiting."""

    def apply_many(self, requests: Sequence[Sequence[Op]]) -> list[list[bool] | StoreError]:
        return super().apply_many(requests)[:-1]


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


def test_a_failed_batch_fails_its_callers_and_the_next_batch_is_tried_again():
    store = FailingStore(failures=1)

    async def main():
        committer = GroupCommitter(store)
        try:
            store.gate.clear()  # the 20 submits pile up into one batch
            tasks = [asyncio.ensure_future(committer.submit(op)) for op in puts(20)]
            await asyncio.sleep(0)
            store.gate.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, StoreError) for r in results)
            assert "disk on fire" in str(results[0])
            assert results[0].path == "/x.db"
            assert results[0] is not results[1]
            assert committer.errors == 20
            assert "disk on fire" in committer.last_error
            # no sticky state: the next batch goes to the store again
            assert await committer.submit(Put("q", msg("later"))) is True
        finally:
            await committer.aclose()

    asyncio.run(main())
    assert [s.message.id for s in store.load()] == ["later"]


def test_a_poison_op_is_refused_alone_and_the_writer_goes_on(tmp_path):
    poison = msg("poison", attempt=2**64)  # msgpack cannot hold it

    async def main(store):
        async with GroupCommitter(store) as committer:
            assert await committer.submit(Put("q", msg("a"))) is True
            results = asyncio.gather(
                committer.submit_many([Put("q", msg("b")), Put("q", msg("c"))]),
                committer.submit(Requeue("q", poison, 0.0)),
                committer.submit(Ack("q", "a")),
                return_exceptions=True,
            )
            good, bad, ack = await results
            assert good == [True, True]
            assert ack is True
            assert isinstance(bad, StoreError)
            assert "poison" in str(bad) and "OverflowError" in str(bad)
            assert committer.errors == 1
            # later batches are not touched by it
            for i in range(5):
                assert await committer.submit(Put("q", msg(f"later{i}"))) is True

    for store in (MemoryStore(), SqliteStore(tmp_path / "q.db")):
        with store:
            asyncio.run(main(store))
            ids = [s.message.id for s in store.load()]
            assert ids == ["b", "c", *(f"later{i}" for i in range(5))]
            assert store.stats()["refused_ops"] == 1


def test_disk_full_through_the_committer_and_back(tmp_path):
    path = tmp_path / "q.db"

    async def main(store):
        async with GroupCommitter(store) as committer:
            assert await committer.submit_many(puts(5, "kept")) == [True] * 5
            pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
            store._conn.execute(f"PRAGMA max_page_count = {pages}")
            big = [Put("q", msg(f"big{i}", b"x" * 2000)) for i in range(100)]
            with pytest.raises(StoreError, match="disk is full"):
                await committer.submit_many(big)
            assert committer.errors == 1
            store._conn.execute("PRAGMA max_page_count = 1073741823")  # space came back
            assert await committer.submit_many(big) == [True] * 100

    with SqliteStore(path) as store:
        asyncio.run(main(store))
    with SqliteStore(path) as store:
        assert len(store.load()) == 105


@pytest.mark.parametrize("error", [KeyError("a bug"), OverflowError("too big"), MemoryError()])
def test_an_unexpected_error_in_apply_never_leaves_a_caller_waiting(error):
    async def main():
        committer = GroupCommitter(BuggyStore(failures=2, error=error))
        try:
            with pytest.raises(StoreError, match="unexpectedly"):
                await committer.submit(Put("q", msg("a")))
            with pytest.raises(StoreError, match=type(error).__name__):
                await committer.submit(Put("q", msg("b")))
            # the writer thread is alive and serves the next batch
            assert await committer.submit(Put("q", msg("c"))) is True
            assert committer.errors == 2
        finally:
            await committer.aclose()

    asyncio.run(main())


def test_a_store_answering_too_few_results_fails_the_batch_not_the_writer():
    async def main():
        committer = GroupCommitter(ShortStore())
        try:
            with pytest.raises(StoreError, match="unexpectedly"):
                await committer.submit(Put("q", msg("a")))
            with pytest.raises(StoreError, match="unexpectedly"):
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


def test_a_read_sees_the_writes_queued_before_it_and_answers_after_them():
    store = RecordingStore()
    order: list[str] = []

    async def main():
        async with GroupCommitter(store) as committer:
            store.gate.clear()  # hold the writer so everything queues up
            before = committer.enqueue([Put("q", msg("a")), Put("q", msg("b"))])
            read = committer.read(
                lambda s: [r.message.id for _, r in s.page("q", 0, limit=9, max_bytes=1 << 20).rows]
            )
            after = committer.enqueue([Put("q", msg("c"))])
            before.add_done_callback(lambda _: order.append("before"))
            read.add_done_callback(lambda _: order.append("read"))
            after.add_done_callback(lambda _: order.append("after"))
            store.gate.set()
            assert await read == ["a", "b"]  # not "c": it was queued later
            await after

    asyncio.run(main())
    assert order == ["before", "read", "after"]
    assert store.batches == [2, 1]  # the read split the writes around it


def test_a_failing_read_answers_store_error_and_the_writer_goes_on():
    store = RecordingStore()

    def broken(_store):
        raise StoreError("bad page", path="/x.db")

    async def main():
        async with GroupCommitter(store) as committer:
            with pytest.raises(StoreError, match="bad page"):
                await committer.read(broken)
            with pytest.raises(StoreError, match="unexpectedly"):
                await committer.read(lambda _s: 1 / 0)
            assert await committer.submit(Put("q", msg("a"))) is True
            assert committer.errors == 2

    asyncio.run(main())
