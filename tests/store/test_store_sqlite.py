"""SqliteStore on its own: reopen, bad files, a second process, a full disk, a crash."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pigeon.errors import ConfigurationError, StoreError
from pigeon.store import Ack, Dead, Put, Replay, Requeue, SqliteStore, StoredMessage

from .conftest import T0, FakeClock, msg
from .writer_child import write_then_kill


def fill(path: Path, batches: int = 20, per_batch: int = 100) -> None:
    with SqliteStore(path) as store:
        for b in range(batches):
            store.apply([Put("q", msg(f"{b}-{i}", b"x" * 100)) for i in range(per_batch)])


def raw_rows(path: Path, where: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT count(*) FROM messages WHERE {where}").fetchone()[0]


def test_state_survives_reopen(tmp_path, clock):
    path = tmp_path / "q.db"
    with SqliteStore(path, clock=clock) as store:
        store.apply([Put("q", msg(c)) for c in "abcde"])
        store.apply(
            [
                Requeue("q", msg("b", attempt=1, headers={"e": "1"}), T0 + 9.5),
                Dead("q", msg("c", attempt=3, headers={"why": "x"}), "poison"),
                Ack("q", "d"),
            ]
        )
        before = (store.load(), store.dead_letters(), store.counts())
    with SqliteStore(path, clock=clock) as store:
        assert (store.load(), store.dead_letters(), store.counts()) == before
        assert before[0][1] == StoredMessage("q", msg("b", attempt=1, headers={"e": "1"}), T0 + 9.5)
        assert before[1][0].message.headers == {"why": "x"}
        # the acked id's tombstone was on disk too
        puts = [Put("q", msg("d")), Put("q", msg("c")), Put("q", msg("f"))]
        assert store.apply(puts) == [False, False, True]
        assert store.apply([Replay("q", "c")]) == [True]


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_both_modes_commit_and_reopen(tmp_path, synchronous):
    with SqliteStore(tmp_path / "q.db", synchronous=synchronous) as store:
        assert store.apply([Put("q", msg("a"))]) == [True]
    with SqliteStore(tmp_path / "q.db", synchronous=synchronous) as store:
        assert [s.message.id for s in store.load()] == ["a"]


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="synchronous"):
        SqliteStore(tmp_path / "q.db", synchronous="off")
    assert not (tmp_path / "q.db").exists()


def test_expired_tombstones_are_pruned_from_disk(tmp_path):
    clock = FakeClock()
    path = tmp_path / "q.db"
    with SqliteStore(path, clock=clock, dedupe_window=10.0) as store:
        store.apply([Put("q", msg(str(i))) for i in range(50)])
        store.apply([Ack("q", str(i)) for i in range(50)])
    assert raw_rows(path, "state = 2") == 50
    with SqliteStore(path, clock=clock, dedupe_window=10.0) as store:
        clock.advance(11.0)
        store.apply([Put("q", msg("new"))])
    assert raw_rows(path, "state = 2") == 0


def corrupt_page(path: Path) -> None:
    with open(path, "r+b") as file:
        file.seek(2 * 4096)  # a b-tree page of the messages table
        file.write(random.Random(1).randbytes(200))


def truncate_to(fraction: float):
    def cut(path: Path) -> None:
        os.truncate(path, int(path.stat().st_size * fraction) // 4096 * 4096)

    return cut


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(corrupt_page, id="garbage-page"),
        pytest.param(truncate_to(0.5), id="truncated-half"),
        pytest.param(lambda p: os.truncate(p, p.stat().st_size - 100), id="truncated-tail"),
        pytest.param(lambda p: os.truncate(p, 50), id="truncated-header"),
        pytest.param(lambda p: p.write_bytes(os.urandom(8192)), id="not-sqlite"),
    ],
)
def test_a_damaged_file_is_refused_and_left_alone(tmp_path, damage):
    path = tmp_path / "q.db"
    fill(path)
    damage(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as info:
        SqliteStore(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert path.read_bytes() == before  # never emptied or recreated
    with pytest.raises(StoreError):  # and the failed open left nothing locked or open
        SqliteStore(path)


def test_another_applications_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER)")
        conn.commit()
    with pytest.raises(StoreError, match="not a pigeon store"):
        SqliteStore(path)


def test_a_row_changed_behind_the_stores_back_is_refused_at_open(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        store.apply([Put("q", msg("a")), Put("q", msg("b"))])
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE messages SET message = x'c1c2c3' WHERE id = 'b'")
        conn.commit()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"1 row\(s\) fail their checksum") as info:
        SqliteStore(path)
    assert "salvage=True" in str(info.value)
    assert path.read_bytes() == before


def test_a_row_damaged_while_open_fails_load_and_dead_letters(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        store.apply([Put("q", msg("a")), Put("q", msg("d")), Dead("q", msg("d"), "x")])
        # bytes changing under the store (its connection holds the file locks)
        store._conn.execute("UPDATE messages SET message = x'c1c2c3'")
        with pytest.raises(StoreError, match=r"1 stored row\(s\) fail their checksum.*'a'"):
            store.load()
        with pytest.raises(StoreError, match=r"fail their checksum.*'d'"):
            store.dead_letters()
        # a replay of the damaged dead letter is refused alone; the rest commits
        results = store.apply_many([[Replay("q", "d")], [Put("q", msg("e"))]])
        assert isinstance(results[0], StoreError) and "checksum" in str(results[0])
        assert results[1] == [True]


def test_a_missing_directory_is_a_store_error_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / "q.db"
    with pytest.raises(StoreError, match="nowhere"):
        SqliteStore(path)


def test_a_second_process_is_refused_while_the_first_holds_the_store(tmp_path):
    path = tmp_path / "q.db"
    holder = (
        "import sys; from pigeon.store import SqliteStore\n"
        "with SqliteStore(sys.argv[1]):\n"
        "    print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if line != "ready\n":
            proc.stdin.close()
            code = proc.wait(timeout=10)
            pytest.fail(f"holder: {line!r}, exit code {code}\n{proc.stderr.read()}")
        with pytest.raises(StoreError, match=f"already open \\(held by pid {proc.pid}\\)"):
            SqliteStore(path)
    finally:
        if not proc.stdin.closed:
            proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()
        errors = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == 0, f"holder: exit code {proc.returncode}\n{errors}"
    with SqliteStore(path) as store:  # released once the holder is gone
        assert store.load() == []


def test_a_second_open_in_the_same_process_is_refused(tmp_path):
    with SqliteStore(tmp_path / "q.db"):
        with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
            SqliteStore(tmp_path / "q.db")
    SqliteStore(tmp_path / "q.db").close()


def test_disk_full_fails_the_batch_keeps_what_was_committed_and_recovers(tmp_path):
    path = tmp_path / "q.db"
    store = SqliteStore(path)
    try:
        store.apply([Put("q", msg(f"kept-{i}")) for i in range(10)])
        # Simulate a full disk: SQLite may not grow the file any further.
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")
        big = [Put("q", msg(f"big-{i}", b"x" * 1000)) for i in range(200)]
        with pytest.raises(StoreError, match="disk is full") as info:
            store.apply(big)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert store.stats()["write_errors"] == 1
        # no sticky state: acks and small writes that fit still go through...
        assert store.apply([Ack("q", "kept-0")]) == [True]
        # ...and once there is room again, so does the batch that failed
        store._conn.execute("PRAGMA max_page_count = 1073741823")
        assert store.apply(big) == [True] * 200
    finally:
        store.close()
    with SqliteStore(path) as store:
        ids = [s.message.id for s in store.load()]
        assert ids == [f"kept-{i}" for i in range(1, 10)] + [f"big-{i}" for i in range(200)]


def boundaries(seed: int, upto: int) -> set[int]:
    """Message counts at which the writer child's batches end."""
    sizes, n, ends = random.Random(seed), 0, {0}
    while n <= upto:
        n += sizes.randint(1, 50)
        ends.add(n)
    return ends


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_confirmed_batch_survives_sigkill(tmp_path):
    for seed in range(10):
        path = tmp_path / f"crash-{seed}.db"
        rng = random.Random(seed)
        # land the kill anywhere in a batch
        confirmed = write_then_kill(path, seed, rng.randint(1, 40), pause=rng.random() * 0.003)
        with SqliteStore(path) as store:
            stored = [s.message.id for s in store.load()]
        assert set(confirmed) <= set(stored), f"seed {seed}: a confirmed id was lost"
        # ids are numbered in order, so this says: nothing missing, nothing reordered,
        assert stored == [f"{i:08d}" for i in range(len(stored))]
        # at most the batch in flight is extra, and never part of a batch
        assert len(stored) - len(confirmed) <= 50
        assert len(stored) in boundaries(seed, len(stored))


def test_store_files_are_private(tmp_path) -> None:
    import stat

    old = os.umask(0o022)
    try:
        path = str(tmp_path / "private.db")
        store = SqliteStore(path)
        try:
            store.apply([Put("q", msg("m1"))])
            names = [path, path + "-wal", path + "-shm", path + ".lock"]
            modes = {n: stat.S_IMODE(os.stat(n).st_mode) for n in names if os.path.exists(n)}
            assert path + "-wal" in modes and path + ".lock" in modes
            assert set(modes.values()) == {0o600}, modes
        finally:
            store.close()
    finally:
        os.umask(old)
