"""The durable store: one SQLite file in WAL mode, written one batch per commit.

Crash safety rests on three things. Each :meth:`SqliteStore.apply` is one
``BEGIN IMMEDIATE`` ... ``COMMIT``, so a batch is on disk whole or not at
all. With ``synchronous="full"`` (the default) SQLite fsyncs the WAL before
``COMMIT`` returns, so an ``apply`` that returned survives a power cut. And a
failed write is never retried on the same connection: after a failed fsync
the OS may have dropped the dirty pages, so the only honest state is the one
on disk, which a reopen reads.

All messages live in one table; ``state`` says whether a row is live, dead, or
the tombstone of an acked id (kept ``dedupe_window`` seconds, then pruned).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import msgspec

from ..errors import ConfigurationError, StoreError
from .base import (
    Ack,
    Dead,
    DeadLetter,
    Op,
    Put,
    Requeue,
    StoredMessage,
    check_ops,
    closed_error,
    decode_message,
    encode_message,
)

__all__ = ["SqliteStore"]

LIVE, DEAD, ACKED = 0, 1, 2
# Marks a file as a pigeon store, so opening some other SQLite file is refused
# instead of adding tables to it.
APPLICATION_ID = 0x5047_4E31  # "PGN1"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    state INTEGER NOT NULL,                 -- 0 live, 1 dead, 2 acked tombstone
    message BLOB NOT NULL,                  -- msgpack Message; empty for tombstones
    ready_at REAL NOT NULL DEFAULT 0,
    reason TEXT,                            -- why it died
    at REAL,                                -- died_at, or acked_at for tombstones
    UNIQUE (queue, id)
);
-- Only tombstones are indexed by time, so pruning is cheap and puts pay nothing.
CREATE INDEX tombstones ON messages (at) WHERE state = 2;
"""

_SYNC_MODES = {"full": "FULL", "normal": "NORMAL"}


@contextlib.contextmanager
def _translate(path: str, doing: str) -> Iterator[None]:
    # The one place sqlite3 (and stored-data decode) errors become StoreError.
    try:
        yield
    except (sqlite3.Error, msgspec.DecodeError) as exc:
        raise StoreError(f"store {path}: {doing} failed: {exc}", path=path) from exc


def _create_private(path: str) -> None:
    """Make ``path`` 0600 if it does not exist yet (an existing file keeps its mode)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot create store {path}: {exc.strerror}", path=path) from exc


def _lock(path: str) -> int:
    """Take the exclusive lock on ``path + ".lock"`` and return its descriptor.

    Raises:
        StoreError: the lock file cannot be made, or another opener holds it.
    """
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(
            f"cannot open store {path}: cannot create {lock_path}: {exc.strerror}", path=path
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreError(
                f"store {path} is already open (held by pid {holder}); "
                "only one process may use a store at a time",
                path=path,
            ) from exc
        raise StoreError(f"cannot lock store {path}: {exc.strerror}", path=path) from exc
    # The pid is only for the error message above; the flock is the lock.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _check_length(path: str) -> None:
    """Refuse a file shorter than its header says: SQLite would read zeros there.

    Raises:
        StoreError: the file is truncated, or cannot be read.
    """
    wal = path + "-wal"
    try:
        with open(path, "rb") as file:
            header, size = file.read(100), os.fstat(file.fileno()).st_size
        # Pages in a WAL may lie past the end of the main file until checkpointed.
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            return
    except FileNotFoundError:
        return  # a new store
    except OSError as exc:
        raise StoreError(f"cannot read store {path}: {exc.strerror}", path=path) from exc
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return  # empty (a new store), or SQLite's own check will refuse it
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is only valid when these two counters agree.
    if header[24:28] == header[92:96] and pages * page_size > size:
        raise StoreError(
            f"store {path} is truncated: {size} bytes, its header says {pages * page_size}",
            path=path,
        )


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    """Open, check and set up the database; never modify a file that fails the check.

    Raises:
        StoreError: the file is corrupt, not a pigeon store, or cannot be opened.
    """
    _check_length(path)
    with _translate(path, "open"):
        # Message bodies are nobody else's business: a new store is made
        # 0600, and SQLite gives its -wal and -shm files the same mode.
        _create_private(path)
        # check_same_thread=False: the store's own lock serialises every use.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    ok = False
    try:
        with _translate(path, "open"):
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(f"store {path} is corrupt: {'; '.join(problems[:3])}", path=path)
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if has_tables and app_id != APPLICATION_ID:
                raise StoreError(f"{path} is an SQLite file but not a pigeon store", path=path)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {path} has format {version}, newer than this pigeon "
                    f"understands ({SCHEMA_VERSION})",
                    path=path,
                )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"store {path} cannot use WAL mode (got {mode})", path=path)
            conn.execute(f"PRAGMA synchronous={_SYNC_MODES[synchronous]}")
            if not has_tables:
                # One transaction: a crash leaves either no tables or a marked store.
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA}"
                    f" PRAGMA application_id={APPLICATION_ID};"
                    f" PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
        ok = True
    finally:
        if not ok:
            conn.close()
    return conn


_ROWS_PER_STATEMENT = 200  # 3 parameters a row stays far below SQLite's limit


def _chunks(run: Sequence[Op], size: int) -> list[Sequence[Op]]:
    return [run[i : i + size] for i in range(0, len(run), size)]


def _run_kind(op: Op) -> tuple[type, bool]:
    # Ops of one kind go in one executemany; acks with and without a
    # tombstone are different statements.
    return type(op), getattr(op, "tombstone", True)


class SqliteStore:
    """A durable :class:`~pigeon.store.base.Store` in one SQLite file (WAL mode).

    Modes:
        ``synchronous="full"`` (default): every ``apply`` that returned is
        fsynced; it survives a process crash, an OS crash and a power cut.
        ``synchronous="normal"``: the relaxed mode. Survives a process crash,
        but on an OS crash or power cut the last commits before it may be
        lost (never a partial batch; the file stays consistent).

    Only one process may open a store at a time (an ``flock`` on
    ``path + ".lock"``). Opening runs ``PRAGMA quick_check``, which reads the
    whole file. Messages come back from :meth:`load` exactly as written;
    marking them redelivered after a restart is the host's job.

    Args:
        path: the database file; its directory must exist.
        synchronous: ``"full"`` or ``"normal"``, see above.
        dedupe_window: seconds an acked id is still refused as a duplicate.
        clock: wall-clock source, replaceable in tests.

    Raises:
        ConfigurationError: an option is not valid.
        StoreError: the file is corrupt, not a pigeon store, in use by another
            opener, or cannot be opened; the message names the path.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "full",
        dedupe_window: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in _SYNC_MODES:
            raise ConfigurationError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if dedupe_window < 0:
            raise ConfigurationError(f"dedupe_window must be >= 0, not {dedupe_window}")
        self.path = os.fspath(path)
        self.synchronous = synchronous
        self._window = dedupe_window
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._broken = False
        self._lock_fd = _lock(self.path)
        ok = False
        try:
            self._conn = _connect(self.path, synchronous)
            ok = True
        finally:
            if not ok:
                os.close(self._lock_fd)
        self._last_prune = clock()

    def apply(self, ops: Sequence[Op]) -> list[bool]:
        """Apply ``ops`` in order, in one transaction with one commit.

        Returns:
            One bool per op, as :meth:`pigeon.store.base.Store.apply` says.

        Raises:
            TypeError: an item is not an op; nothing was applied.
            StoreError: the commit failed (disk full, I/O error, ...); nothing
                of the batch was applied, and this store refuses every later
                ``apply`` until it is closed and reopened.
            ClosedError: the store was closed.
        """
        check_ops(ops)
        with self._lock:
            self._check_open()
            if self._broken:
                raise StoreError(
                    f"store {self.path} refuses writes after an earlier failure; reopen it",
                    path=self.path,
                )
            if not ops:
                return []
            now = self._clock()
            committed = False
            try:
                with _translate(self.path, "write"):
                    self._conn.execute("BEGIN IMMEDIATE")
                    results = self._apply_all(ops, now)
                    self._prune(now)
                    self._conn.execute("COMMIT")
                committed = True
            finally:
                if not committed:
                    # Never retry: a failed fsync may have dropped pages, so
                    # only a reopen knows what is really on disk.
                    self._broken = True
                    self._rollback()
            return results

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            # The error being raised matters more than a failed rollback.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _apply_all(self, ops: Sequence[Op], now: float) -> list[bool]:
        """Apply ops in order; runs of Puts or Acks go in one executemany.

        A run is tried whole inside a savepoint; if any row of it was not the
        plain case (a duplicate put, a stale ack), the savepoint is rolled back
        and that run is applied op by op, which answers per op.
        """
        results: list[bool] = []
        start = 0
        while start < len(ops):
            kind = _run_kind(ops[start])
            end = start + 1
            while end < len(ops) and _run_kind(ops[end]) == kind:
                end += 1
            run = ops[start:end]
            if kind[0] in (Put, Ack) and len(run) > 1 and self._apply_run(kind, run, now):
                results += [True] * len(run)
            else:
                results += [self._apply_one(op, now) for op in run]
            start = end
        return results

    def _apply_run(self, kind: tuple[type, bool], run: Sequence[Op], now: float) -> bool:
        conn = self._conn
        conn.execute("SAVEPOINT run")
        before = conn.total_changes
        # Many rows per statement: executemany would step (and hand the GIL
        # back and forth) once per row, which a busy host thread makes slow.
        for chunk in _chunks(run, _ROWS_PER_STATEMENT):
            if kind[0] is Put:
                rows = [
                    value
                    for op in chunk
                    for value in (op.queue, op.message.id, encode_message(op.message))  # type: ignore[union-attr]
                ]
                values = ", ".join(["(?, ?, 0, ?)"] * len(chunk))
                conn.execute(
                    f"INSERT OR IGNORE INTO messages (queue, id, state, message) VALUES {values}",
                    rows,
                )
                continue
            keys = [value for op in chunk for value in (op.queue, op.id)]  # type: ignore[union-attr]
            where = " OR ".join(["(queue = ? AND id = ?)"] * len(chunk))
            if self._window > 0 and kind[1]:
                conn.execute(
                    "UPDATE messages SET state = 2, message = x'', ready_at = 0, at = ?"
                    f" WHERE state = 0 AND ({where})",
                    [now, *keys],
                )
            else:
                conn.execute(f"DELETE FROM messages WHERE state = 0 AND ({where})", keys)
        if conn.total_changes - before == len(run):
            conn.execute("RELEASE run")
            return True
        conn.execute("ROLLBACK TO run")
        conn.execute("RELEASE run")
        return False

    def _apply_one(self, op: Op, now: float) -> bool:
        run = self._conn.execute
        if isinstance(op, Put):
            key = (op.queue, op.message.id)
            insert = (
                "INSERT OR IGNORE INTO messages (queue, id, state, message) VALUES (?, ?, 0, ?)"
            )
            if run(insert, (*key, encode_message(op.message))).rowcount:
                return True
            state, acked_at = run(
                "SELECT state, at FROM messages WHERE queue = ? AND id = ?", key
            ).fetchone()
            if state != ACKED or now - acked_at <= self._window:
                return False
            run("DELETE FROM messages WHERE queue = ? AND id = ?", key)
            run(insert, (*key, encode_message(op.message)))
            return True
        if isinstance(op, Ack):
            if self._window > 0 and op.tombstone:
                sql = (
                    "UPDATE messages SET state = 2, message = x'', ready_at = 0, at = ?"
                    " WHERE queue = ? AND id = ? AND state = 0"
                )
                return run(sql, (now, op.queue, op.id)).rowcount > 0
            sql = "DELETE FROM messages WHERE queue = ? AND id = ? AND state = 0"
            return run(sql, (op.queue, op.id)).rowcount > 0
        if isinstance(op, Requeue):
            sql = (
                "UPDATE messages SET message = ?, ready_at = ?"
                " WHERE queue = ? AND id = ? AND state = 0"
            )
            args = (encode_message(op.message), op.ready_at, op.queue, op.message.id)
            return run(sql, args).rowcount > 0
        if isinstance(op, Dead):
            key = (op.queue, op.message.id)
            # Delete and re-insert, so dead letters list in the order they died.
            sql = "DELETE FROM messages WHERE queue = ? AND id = ? AND state = 0"
            if not run(sql, key).rowcount:
                return False
            run(
                "INSERT INTO messages (queue, id, state, message, reason, at)"
                " VALUES (?, ?, 1, ?, ?, ?)",
                (*key, encode_message(op.message), op.reason, now),
            )
            return True
        key = (op.queue, op.id)
        row = run("SELECT message FROM messages WHERE queue = ? AND id = ? AND state = 1", key)
        found = row.fetchone()
        if found is None:
            return False
        message = decode_message(found[0])
        message.attempt = 0
        run("DELETE FROM messages WHERE queue = ? AND id = ?", key)
        run(
            "INSERT INTO messages (queue, id, state, message) VALUES (?, ?, 0, ?)",
            (*key, encode_message(message)),
        )
        return True

    def _prune(self, now: float) -> None:
        # Lazy: at most every half window, inside a write that is happening anyway.
        if self._window > 0 and now - self._last_prune >= self._window / 2:
            cutoff = now - self._window
            self._conn.execute("DELETE FROM messages WHERE state = 2 AND at < ?", (cutoff,))
            self._last_prune = now

    def load(self) -> list[StoredMessage]:
        """Return every live message in insertion order.

        Raises:
            StoreError: the store could not be read, or a row does not decode.
            ClosedError: the store was closed.
        """
        sql = "SELECT queue, message, ready_at FROM messages WHERE state = 0 ORDER BY seq"
        with self._lock, _translate(self.path, "load"):
            self._check_open()
            return [
                StoredMessage(queue, decode_message(data), ready_at)
                for queue, data, ready_at in self._conn.execute(sql)
            ]

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """Return the dead letters, of one queue or all, in the order they died.

        Raises:
            StoreError: the store could not be read, or a row does not decode.
            ClosedError: the store was closed.
        """
        sql = "SELECT queue, message, reason, at FROM messages WHERE state = 1"
        args: tuple[str, ...] = ()
        if queue is not None:
            sql, args = sql + " AND queue = ?", (queue,)
        with self._lock, _translate(self.path, "read dead letters"):
            self._check_open()
            return [
                DeadLetter(q, decode_message(data), reason, died_at)
                for q, data, reason, died_at in self._conn.execute(sql + " ORDER BY seq", args)
            ]

    def counts(self) -> dict[str, dict[str, int]]:
        """Return ``{queue: {"ready": n, "dead": m}}`` for every non-empty queue.

        Raises:
            StoreError: the store could not be read.
            ClosedError: the store was closed.
        """
        sql = "SELECT queue, state, count(*) FROM messages WHERE state < 2 GROUP BY queue, state"
        counts: dict[str, dict[str, int]] = {}
        with self._lock, _translate(self.path, "count"):
            self._check_open()
            for queue, state, n in self._conn.execute(sql):
                entry = counts.setdefault(queue, {"ready": 0, "dead": 0})
                entry["ready" if state == LIVE else "dead"] = n
        return counts

    def close(self) -> None:
        """Close the database and release the lock; closing twice is allowed.

        Raises:
            StoreError: SQLite failed to close the file.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                with _translate(self.path, "close"):
                    self._conn.close()
            finally:
                os.close(self._lock_fd)

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error(f"store {self.path}")

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path!r} synchronous={self.synchronous}>"
