"""Damage is found when a store opens, never dropped silently; salvage keeps
what checks out. Also: the commit record, format-1 stores, the disk-free
floor and read-only files, on SqliteStore itself."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest

from pigeon.errors import ConfigurationError, StoreError
from pigeon.store import Ack, Dead, Put, Requeue, SqliteStore, integrity
from pigeon.store.integrity import CommitRecord, read_record, write_record
from pigeon.store.schema import APPLICATION_ID

from .conftest import msg
from .writer_child import write_then_kill


def wal_geometry(wal: Path) -> tuple[int, int]:
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    return page_size + 24, (len(data) - 32) // (page_size + 24)


def garble(wal: Path, frames: list[int], seed: int = 0) -> None:
    """Overwrite 64 bytes of the page data of each frame."""
    size, _ = wal_geometry(wal)
    rng = random.Random(seed)
    with open(wal, "r+b") as file:
        for frame in frames:
            file.seek(32 + frame * size + 24 + rng.randrange(size - 24 - 64))
            file.write(os.urandom(64))


def quarantined(store: SqliteStore) -> dict[str, str]:
    return dict(store._conn.execute("SELECT id, why FROM quarantine").fetchall())


@pytest.mark.slow
@pytest.mark.parametrize("where", ["first-frame", "middle-frame", "late-frame", "wal-header"])
def test_garbage_in_the_wal_after_sigkill_is_found_and_salvaged(tmp_path, where):
    path = tmp_path / "q.db"
    wal = Path(f"{path}-wal")
    confirmed = write_then_kill(path, seed=7)
    _, frames = wal_geometry(wal)
    if where == "wal-header":
        with open(wal, "r+b") as file:
            file.seek(16)
            file.write(os.urandom(8))  # the salts: SQLite then ignores the whole WAL
    else:
        at = {"first-frame": 0, "middle-frame": frames // 2, "late-frame": frames - 20}[where]
        garble(wal, [at])
    before = (path.read_bytes(), wal.read_bytes())

    # SQLite alone would open this and show fewer messages, without an error.
    with pytest.raises(StoreError, match=r"committed write\(s\) are missing") as info:
        SqliteStore(path)
    assert "salvage=True" in str(info.value)
    assert (path.read_bytes(), wal.read_bytes()) == before  # refused, and left as it was

    with SqliteStore(path, salvage=True) as store:
        report = store.salvage_report
        assert report is not None and report["missing_commits"] > 0
        assert store.stats()["salvage"] == report
        loaded = [s.message.id for s in store.load()]
        gone = set(confirmed) - set(loaded) - set(quarantined(store))
        assert loaded == sorted(loaded)  # insertion order kept
    # the damaged files are kept, byte for byte
    assert Path(report["kept_as"]).read_bytes() == before[0]
    assert Path(report["kept_as"] + "-wal").read_bytes() == before[1]
    if where == "wal-header":
        # Nothing can be brought back, and the report says so.
        assert report["recovered_commits"] == 0
        assert gone
    else:
        # One damaged frame: every other frame is chained again and read.
        assert report["recovered_commits"] >= report["missing_commits"] - 1
        assert not gone, f"confirmed and neither restored nor quarantined: {sorted(gone)[:5]}"
    with SqliteStore(path) as store:  # salvaged once, it opens normally
        assert store.salvage_report is None
        assert store.apply([Put("q", msg("after"))]) == [True]


@pytest.mark.slow
def test_heavier_wal_damage_still_accounts_for_what_it_loses(tmp_path):
    path = tmp_path / "q.db"
    confirmed = write_then_kill(path, seed=11)
    wal = Path(f"{path}-wal")
    _, frames = wal_geometry(wal)
    garble(wal, list(range(3, frames, 20)), seed=11)
    with SqliteStore(path, salvage=True) as store:
        report = store.salvage_report
        loaded = {s.message.id for s in store.load()}
        kept_aside = quarantined(store)
    gone = set(confirmed) - loaded - set(kept_aside)
    # Losses are either named (quarantined by key) or the report admits
    # commits it could not bring back.
    assert not gone or report["recovered_commits"] < report["missing_commits"]
    assert report["quarantined"] == len(kept_aside)


@pytest.mark.slow
def test_a_deleted_wal_after_sigkill_is_found(tmp_path):
    path = tmp_path / "q.db"
    confirmed = write_then_kill(path, seed=3, lines=10)
    os.remove(f"{path}-wal")
    with pytest.raises(StoreError, match=r"committed write\(s\) are missing"):
        SqliteStore(path)
    with SqliteStore(path, salvage=True) as store:
        assert store.salvage_report["recovered_commits"] == 0
        assert len(store.load()) < len(confirmed)


def test_an_emptied_store_file_is_not_taken_for_a_new_one(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        store.apply([Put("q", msg("a"))])
    os.truncate(path, 0)
    with pytest.raises(StoreError, match=r"2 committed write\(s\) are missing"):
        SqliteStore(path)
    with SqliteStore(path, salvage=True) as store:
        assert store.load() == []
        assert store.salvage_report["missing_commits"] == 2


def test_a_damaged_page_is_salvaged_by_rows(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        for b in range(20):
            store.apply([Put("q", msg(f"{b}-{i}", b"x" * 100)) for i in range(100)])
        store.apply([Dead("q", msg("0-0"), "bad"), Ack("q", "0-1")])
    # the messages table's root page: every row is unreadable, but the
    # (queue, id) index still names them
    with contextlib.closing(sqlite3.connect(path)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'")
        page = root.fetchone()[0]
    with open(path, "r+b") as file:
        file.seek((page - 1) * 4096)
        file.write(os.urandom(4096))
    with pytest.raises(StoreError, match=r"problem\(s\) in its structure"):
        SqliteStore(path)
    with SqliteStore(path, salvage=True) as store:
        report = store.salvage_report
        assert report["rows_kept"] == 0
        assert report["unreadable_ranges"] == [[1, None]]
        kept_aside = quarantined(store)
        assert len(kept_aside) == 2000 == report["quarantined"] == store.stats()["quarantined"]
        assert set(kept_aside.values()) == {"lost: its row is gone, its key was left in the index"}


def test_a_garbage_leaf_page_costs_only_its_rows(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        for b in range(20):
            store.apply([Put("q", msg(f"{b:02}-{i:03}", b"x" * 100)) for i in range(100)])
    with contextlib.closing(sqlite3.connect(path)) as conn:
        leaves = [
            row[0]
            for row in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf'"
            )
        ]
    if not leaves:
        pytest.skip("this SQLite has no dbstat table")
    with open(path, "r+b") as file:
        file.seek((leaves[len(leaves) // 2] - 1) * 4096)
        file.write(os.urandom(4096))
    with SqliteStore(path, salvage=True) as store:
        report = store.salvage_report
        loaded = [s.message.id for s in store.load()]
        kept_aside = quarantined(store)
    assert 1900 < len(loaded) < 2000
    assert len(loaded) + len(kept_aside) == 2000
    assert report["unreadable_ranges"] or report["quarantined"]


def test_a_row_failing_its_checksum_is_quarantined_by_salvage(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        store.apply([Put("q", msg(f"m{i}")) for i in range(10)])
        store.apply([Requeue("q", msg("m3", attempt=2), 1e9)])
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE messages SET ready_at = 5 WHERE id = 'm3'")  # a silent change
        conn.commit()
    with pytest.raises(StoreError, match=r"1 row\(s\) fail their checksum \(seq 4"):
        SqliteStore(path)
    with SqliteStore(path, salvage=True) as store:
        assert [s.message.id for s in store.load()] == [f"m{i}" for i in range(10) if i != 3]
        assert quarantined(store) == {"m3": "checksum mismatch"}
        assert store.salvage_report["quarantined"] == 1
    with SqliteStore(path) as store:  # the quarantine stays, and is counted
        assert store.stats()["quarantined"] == 1


# -- the commit record -----------------------------------------------------


def forge_record(path: Path, **changes: object) -> None:
    fd = os.open(f"{path}.lock", os.O_RDWR)
    try:
        record = read_record(fd)
        assert record is not None
        write_record(fd, record._replace(**changes))
    finally:
        os.close(fd)


def test_the_record_follows_every_commit(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        for i in range(5):
            store.apply([Put("q", msg(f"m{i}"))])
        fd = os.open(f"{path}.lock", os.O_RDONLY)
        try:
            record = read_record(fd)
        finally:
            os.close(fd)
        assert record == CommitRecord(store._store_id, 6, "full", integrity.boot_id())
        assert store.stats()["commits"] == 6  # creating the store is the first
    # the lock file still names its holder for a second opener's error message
    assert Path(f"{path}.lock").read_bytes()[:32].decode().strip() == str(os.getpid())


def test_a_shortfall_after_an_os_restart_in_normal_mode_is_reported_not_refused(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path, synchronous="normal") as store:
        store.apply([Put("q", msg("a"))])
    # As if the machine stopped before the last 3 commits reached the disk.
    forge_record(path, commits=5, boot="00" * 16 if integrity.boot_id() else "")
    with SqliteStore(path) as store:
        assert store.stats()["lost_in_os_crash"] == 3
        assert [s.message.id for s in store.load()] == ["a"]
    # the same shortfall in "full" mode is damage: its commits were fsynced
    forge_record(path, commits=5, mode="full", boot="00" * 16)
    with pytest.raises(StoreError, match="missing"):
        SqliteStore(path)


def test_a_record_of_another_store_is_ignored(tmp_path):
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    with SqliteStore(first) as store:
        for i in range(3):
            store.apply([Put("q", msg(f"m{i}"))])
    with SqliteStore(second):
        pass
    shutil.copyfile(f"{first}.lock", f"{second}.lock")  # ahead, but of another store
    with SqliteStore(second) as store:
        assert store.load() == []


def test_a_garbled_record_is_no_record(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        store.apply([Put("q", msg("a"))])
    with open(f"{path}.lock", "r+b") as file:
        file.seek(integrity.RECORD_OFFSET + 30)
        file.write(b"\xff")
    with SqliteStore(path) as store:
        assert len(store.load()) == 1


# -- format 1 ------------------------------------------------------------------

FORMAT_1 = f"""
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, id TEXT NOT NULL,
    state INTEGER NOT NULL, message BLOB NOT NULL, ready_at REAL NOT NULL DEFAULT 0,
    reason TEXT, at REAL, UNIQUE (queue, id)
);
CREATE INDEX tombstones ON messages (at) WHERE state = 2;
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = 1;
"""


def make_format_1(path: Path, rows: list[tuple[str, bytes]]) -> None:
    from pigeon.store.base import encode_message

    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(FORMAT_1)
        for id, data in rows:
            blob = encode_message(msg(id)) if data is None else data
            conn.execute(
                "INSERT INTO messages (queue, id, state, message) VALUES ('q', ?, 0, ?)", (id, blob)
            )
        conn.commit()


def test_a_format_1_store_is_migrated(tmp_path):
    path = tmp_path / "q.db"
    make_format_1(path, [("a", None), ("b", None)])
    with SqliteStore(path) as store:
        assert [s.message.id for s in store.load()] == ["a", "b"]
        assert store.apply([Ack("q", "a"), Put("q", msg("c"))]) == [True, True]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    with SqliteStore(path) as store:
        assert [s.message.id for s in store.load()] == ["b", "c"]


def test_a_format_2_store_gains_the_live_rows_index_in_one_counted_commit(tmp_path):
    from pigeon.store import schema
    from pigeon.store.base import encode_message

    path = tmp_path / "q.db"
    with contextlib.closing(schema.connect(str(path))) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(
            f"BEGIN; {schema.MESSAGES} {schema.EXTRA}"
            f" PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 2;"
        )
        schema._fill_meta(conn, None, 5)
        blob = encode_message(msg("a"))
        conn.execute(
            "INSERT INTO messages (queue, id, state, message, crc) VALUES ('q', 'a', 0, ?, ?)",
            (blob, integrity.row_crc("q", "a", 0, blob, 0.0, None, None)),
        )
        conn.execute("COMMIT")
    with SqliteStore(path) as store:
        assert store.stats()["commits"] == 6
        assert [r.message.id for _, r in store.page("q", 0, limit=9, max_bytes=1 << 20).rows] == [
            "a"
        ]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT seq FROM messages"
            " WHERE seq > 0 AND queue = 'q' AND state = 0 ORDER BY seq"
        ).fetchall()
        assert "live_rows" in str(plan)
    with SqliteStore(path) as store:  # reopened cleanly: the commit was counted
        assert len(store.load()) == 1


def test_a_format_1_store_with_a_row_that_does_not_decode_is_refused(tmp_path):
    path = tmp_path / "q.db"
    make_format_1(path, [("a", None), ("b", b"\xc1\xc2")])
    with pytest.raises(StoreError, match="seq 2: unreadable"):
        SqliteStore(path)
    with SqliteStore(path, salvage=True) as store:
        assert [s.message.id for s in store.load()] == ["a"]
        assert list(quarantined(store)) == ["b"]


# -- the disk-free floor -----------------------------------------------------------


class FakeDisk:
    """Stands in for os.statvfs: ``free`` bytes available."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: str) -> os.statvfs_result:
        self.calls += 1
        return os.statvfs_result((4096, 4096, 10**6, 0, self.free // 4096, 0, 0, 0, 0, 255))


def test_below_the_floor_puts_are_refused_and_acks_still_go_through(tmp_path, monkeypatch):
    disk = FakeDisk(free=100 << 20)
    monkeypatch.setattr(os, "statvfs", disk)
    with SqliteStore(tmp_path / "q.db", min_free_disk=64 << 20) as store:
        assert store.apply([Put("q", msg("a")), Put("q", msg("b"))]) == [True, True]
        disk.free = 10 << 20
        store._free_at = -1e9  # the last reading is old
        results = store.apply_many(
            [[Put("q", msg("c"))], [Ack("q", "a")], [Requeue("q", msg("b"), 1.0)]]
        )
        assert isinstance(results[0], StoreError)
        assert "disk free space below the floor: 10.0 MiB free" in str(results[0])
        assert "min_free_disk is 64.0 MiB" in str(results[0])
        assert results[1:] == [[True], [True]]
        with pytest.raises(StoreError, match="below the floor"):
            store.apply([Put("q", msg("d"))])
        assert store.stats()["refused_below_floor"] == 2
        assert store.stats()["free_disk"] == 10 << 20
        disk.free = 100 << 20  # space came back
        store._free_at = -1e9
        assert store.apply([Put("q", msg("d"))]) == [True]
        assert [s.message.id for s in store.load()] == ["b", "d"]


def test_free_space_is_read_at_most_every_tenth_of_a_second(tmp_path, monkeypatch):
    disk = FakeDisk(free=10 << 30)
    monkeypatch.setattr(os, "statvfs", disk)
    with SqliteStore(tmp_path / "q.db") as store:
        for i in range(200):
            store.apply([Put("q", msg(f"m{i}"))])
    assert disk.calls < 50  # a few per 0.1 s, not one per batch


def test_a_batch_that_would_cross_the_floor_reads_free_space_again(tmp_path, monkeypatch):
    disk = FakeDisk(free=(64 << 20) + 3000)
    monkeypatch.setattr(os, "statvfs", disk)
    with SqliteStore(tmp_path / "q.db", min_free_disk=64 << 20) as store:
        assert store.apply([Put("q", msg("a", b"x" * 1000))]) == [True]
        calls = disk.calls
        disk.free = 1 << 20
        # only 2000 bytes of room were left by the last reading: read again
        with pytest.raises(StoreError, match="below the floor"):
            store.apply([Put("q", msg("b", b"x" * 2500))])
        assert disk.calls == calls + 1


def test_min_free_disk_zero_turns_the_floor_off(tmp_path, monkeypatch):
    disk = FakeDisk(free=0)
    monkeypatch.setattr(os, "statvfs", disk)
    with SqliteStore(tmp_path / "q.db", min_free_disk=0) as store:
        assert store.apply([Put("q", msg("a"))]) == [True]
    assert disk.calls == 0


@pytest.mark.parametrize("value", [-1, 1.5, True, "64M"])
def test_bad_min_free_disk_is_refused(tmp_path, value):
    with pytest.raises(ConfigurationError, match="min_free_disk"):
        SqliteStore(tmp_path / "q.db", min_free_disk=value)


# -- values that cannot be stored ---------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(Put("q", msg("big", attempt=2**64)), id="attempt-overflow"),
        pytest.param(Put("bad\udc80", msg("a")), id="surrogate-queue"),
        pytest.param(Put("q", msg("h", headers={"k": object()})), id="header-not-str"),
        pytest.param(Dead("q", msg("x"), "why\udc80"), id="surrogate-reason"),
        pytest.param(Requeue("q", msg("x"), float("nan")), id="nan-ready-at"),
    ],
)
def test_an_op_that_cannot_be_stored_is_refused_alone(tmp_path, op):
    with SqliteStore(tmp_path / "q.db") as store:
        store.apply([Put("q", msg("x"))])
        results = store.apply_many([[Put("q", msg("before"))], [op], [Put("q", msg("after"))]])
        assert results[0] == [True] and results[2] == [True]
        assert isinstance(results[1], StoreError)
        assert "cannot store" in str(results[1])
        assert store.stats()["refused_ops"] == 1
        assert store.apply([Put("q", msg("later"))]) == [True]
        ids = [s.message.id for s in store.load()]
        assert ids == ["x", "before", "after", "later"]


# -- read-only files -------------------------------------------------------------


def immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i; False where the filesystem or tool does not allow it."""
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_read_only_store_is_refused_at_open(tmp_path):
    path = tmp_path / "q.db"
    with SqliteStore(path) as store:
        store.apply([Put("q", msg("a"))])
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
    elif not immutable(path, True):
        pytest.skip("running as root and chattr +i is not available here")
    try:
        with pytest.raises(StoreError, match="read-only"):
            SqliteStore(path)
    finally:
        if os.geteuid() == 0:
            immutable(path, False)
        os.chmod(path, 0o600)
    with SqliteStore(path) as store:
        assert len(store.load()) == 1
