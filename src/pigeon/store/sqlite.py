"""The durable store: one SQLite file in WAL mode, written one batch per commit.

Crash safety rests on two things. Each :meth:`SqliteStore.apply_many` is one
``BEGIN IMMEDIATE`` ... ``COMMIT``, so a batch is on disk whole or not at
all. With ``synchronous="full"`` (the default) SQLite fsyncs the WAL before
``COMMIT`` returns, so a batch that was applied survives a power cut.

A failed batch is rolled back and the next one is tried normally: after an
I/O or disk-full error SQLite's pager throws its cache away and reads the
file again before the next transaction (pager.c, the ERROR state), so there
is no broken state to keep. Damage is looked for when the store is opened
(see :mod:`pigeon.store.integrity` and :mod:`pigeon.store.salvage`).

All messages live in one table; ``state`` says whether a row is live, dead, or
the tombstone of an acked id (kept ``dedupe_window`` seconds, then pruned).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import msgspec

from ..errors import ConfigurationError, StoreError
from .base import (
    Ack,
    Dead,
    DeadLetter,
    Encoded,
    Op,
    Page,
    Put,
    Requeue,
    StoredMessage,
    check_ops,
    closed_error,
    decode_message,
    encode_message,
    encode_request,
)
from .integrity import CommitRecord, RecordWriter, read_record, row_crc
from .salvage import Findings, inspect, salvage
from .schema import (
    ACKED,
    COUNT_COMMIT,
    LIVE,
    ROW_COLUMNS,
    SYNC_MODES,
    connect,
    create,
    format_of,
    migrate,
    read_meta,
    translate,
)

__all__ = ["DEFAULT_MIN_FREE_DISK", "SqliteStore"]

log = logging.getLogger("pigeon.store")

DEFAULT_MIN_FREE_DISK = 64 << 20  # bytes
_FREE_RECHECK = 0.1  # seconds a free-space reading is trusted (unless a batch nears the floor)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _open_writable(path: str, flags: int) -> None:
    """Open ``path`` for writing and close it again.

    Raises:
        StoreError: it cannot be written (read-only file or filesystem,
            immutable, no permission), or made.
    """
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC | flags, 0o600))
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StoreError(
                f"store {path} is read-only ({exc.strerror}): a store must be writable",
                path=path,
            ) from exc
        raise StoreError(f"cannot create store {path}: {exc.strerror}", path=path) from exc


def _check_writable(path: str) -> None:
    """Make ``path`` (0600) if it does not exist yet, and refuse a store
    whose files cannot be written: SQLite would open it read-only and
    refuse every write later, one batch at a time."""
    _open_writable(path, os.O_CREAT)
    if os.path.exists(path + "-wal"):
        _open_writable(path + "-wal", 0)
    # The WAL index lives in memory (schema.connect): a -shm file is a
    # leftover of an older pigeon, and nobody else can be using it now.
    try:
        os.remove(path + "-shm")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot remove {path}-shm: {exc.strerror}", path=path) from exc


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
    # The pid is only for the error message above; the flock is the lock. The
    # commit record after it (integrity.CommitRecord) is kept.
    try:
        os.pwrite(fd, f"{os.getpid():<31}\n".encode(), 0)
    except OSError:
        pass  # only the error message above would miss it
    return fd


def _check_length(path: str) -> str:
    """Describe how the file is shorter than its header says, or "".

    Raises:
        StoreError: the file cannot be read.
    """
    wal = path + "-wal"
    try:
        with open(path, "rb") as file:
            header, size = file.read(100), os.fstat(file.fileno()).st_size
        # Pages in a WAL may lie past the end of the main file until checkpointed.
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            return ""
    except OSError as exc:
        raise StoreError(f"cannot read store {path}: {exc.strerror}", path=path) from exc
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return ""  # empty (a new store), or SQLite's own check will refuse it
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is only valid when these two counters agree.
    if header[24:28] == header[92:96] and pages * page_size > size:
        return f"it is truncated: {size} bytes, its header says {pages * page_size}"
    return ""


def _open(
    path: str,
    synchronous: str,
    record: CommitRecord | None,
    *,
    salvage_damage: bool,
    now: float,
) -> tuple[sqlite3.Connection, Findings, dict[str, Any] | None]:
    """Check, salvage if asked, open and set up the database.

    A file that fails a check is never modified (unless salvage is asked for,
    which keeps a copy of it first).

    Raises:
        StoreError: the file is damaged, not a pigeon store, read-only, or
            cannot be opened.
    """
    _check_writable(path)
    findings = inspect(path, record, truncated=_check_length(path))
    report = None
    if findings.damaged:
        if not salvage_damage:
            raise StoreError(
                f"store {path} is damaged: {findings.describe()}. Nothing was changed. "
                "Open it with salvage=True (pigeon node --salvage) to keep every row "
                "that checks out and move the rest to its quarantine table; the damaged "
                "files are kept beside it.",
                path=path,
            )
        report = salvage(path, findings, record, now)
    with translate(path, "open"):
        conn = connect(path)
    ok = False
    try:
        with translate(path, "open"):
            version, has_tables = format_of(conn, path)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"store {path} cannot use WAL mode (got {mode})", path=path)
            conn.execute(f"PRAGMA synchronous={SYNC_MODES[synchronous]}")
            if not has_tables:
                create(conn)
            else:
                migrate(conn, version)
        ok = True
    finally:
        if not ok:
            conn.close()
    if findings.lost_in_os_crash:
        log.warning(
            "store %s: the last %d commit(s) of the previous run were lost when the "
            "machine stopped (synchronous=normal allows that)",
            path,
            findings.lost_in_os_crash,
        )
    return conn, findings, report


_ROWS_PER_STATEMENT = 200  # 4 parameters a row stays far below SQLite's limit


def _chunks(run: Sequence[Encoded], size: int) -> list[Sequence[Encoded]]:
    return [run[i : i + size] for i in range(0, len(run), size)]


def _run_kind(encoded: Encoded) -> tuple[type, bool]:
    # Ops of one kind go in one statement; acks with and without a
    # tombstone are different statements.
    op = encoded.op
    return type(op), getattr(op, "tombstone", True)


class _DamagedRow(Exception):
    """A stored row an op needs fails its checksum."""


# Errors that belong to one request's data, not to the store: that request
# is refused alone and the rest of the batch commits.
_DATA_ERRORS = (
    _DamagedRow,
    msgspec.DecodeError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    ValueError,
    TypeError,
    OverflowError,
)

_TOMBSTONE = (
    f"UPDATE messages SET state = {ACKED}, message = x'', ready_at = 0, at = ?,"
    f" crc = pigeon_crc(queue, id, {ACKED}, x'', 0.0, reason, ?)"
)


class SqliteStore:
    """A durable :class:`~pigeon.store.base.Store` in one SQLite file (WAL mode).

    Modes:
        ``synchronous="full"`` (default): every ``apply`` that returned is
        fsynced; it survives a process crash, an OS crash and a power cut.
        ``synchronous="normal"``: the relaxed mode. Survives a process crash,
        but on an OS crash or power cut the last commits before it may be
        lost (never a partial batch; the file stays consistent).

    Only one process may open a store at a time (an ``flock`` on
    ``path + ".lock"``, which also keeps the commit record). Opening runs
    ``PRAGMA quick_check`` and verifies every row's checksum, reading the
    whole file; a damaged store is refused unless ``salvage`` is set.
    Messages come back from :meth:`load` exactly as written; marking them
    redelivered after a restart is the host's job.

    Args:
        path: the database file; its directory must exist.
        synchronous: ``"full"`` or ``"normal"``, see above.
        dedupe_window: seconds an acked id is still refused as a duplicate.
        min_free_disk: bytes that must stay free on the store's filesystem:
            below it, batches that add messages (puts) are refused with
            StoreError before the disk is full; acks, requeues, dead letters
            and replays are still written. 0 turns the floor off.
        salvage: open a damaged store anyway: keep every row that checks
            out, move the rest to the ``quarantine`` table, and keep a copy
            of the damaged files (see :attr:`salvage_report`).
        clock: wall-clock source, replaceable in tests.

    Attributes:
        salvage_report: what salvage found and did when the store was
            opened with ``salvage=True`` and was damaged; else None.

    Raises:
        ConfigurationError: an option is not valid.
        StoreError: the file is damaged (and ``salvage`` is not set), not a
            pigeon store, read-only, in use by another opener, or cannot be
            opened; the message names the path and what was found.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "full",
        dedupe_window: float = 120.0,
        min_free_disk: int = DEFAULT_MIN_FREE_DISK,
        salvage: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in SYNC_MODES:
            raise ConfigurationError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if dedupe_window < 0:
            raise ConfigurationError(f"dedupe_window must be >= 0, not {dedupe_window}")
        if isinstance(min_free_disk, bool) or not isinstance(min_free_disk, int):
            raise ConfigurationError(f"min_free_disk must be an int, not {min_free_disk!r}")
        if min_free_disk < 0:
            raise ConfigurationError(f"min_free_disk must be >= 0 bytes, not {min_free_disk}")
        self.path = os.fspath(path)
        self.synchronous = synchronous
        self.min_free_disk = min_free_disk
        self._window = dedupe_window
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._dir = os.path.dirname(os.path.abspath(self.path))
        self._free: int | None = None
        self._free_at = 0.0
        self.write_errors = 0
        self.refused_ops = 0
        self.refused_below_floor = 0
        self._lock_fd = _lock(self.path)
        ok = False
        try:
            record = read_record(self._lock_fd)
            self._conn, findings, self.salvage_report = _open(
                self.path, synchronous, record, salvage_damage=salvage, now=clock()
            )
            try:
                with translate(self.path, "open"):
                    self._store_id, self._commits = read_meta(self._conn)
                    self._quarantined = self._conn.execute(
                        "SELECT count(*) FROM quarantine"
                    ).fetchone()[0]
                    self._max_length = self._conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
            except BaseException:
                self._conn.close()
                raise
            ok = True
        finally:
            if not ok:
                os.close(self._lock_fd)
        self.lost_in_os_crash = findings.lost_in_os_crash
        self._record = RecordWriter(self._lock_fd, self._store_id, synchronous)
        self._write_record()
        self._last_prune = clock()

    # -- writing ---------------------------------------------------------

    def apply(self, ops: Sequence[Op]) -> list[bool]:
        """Apply ``ops`` in order, in one transaction with one commit.

        Returns:
            One bool per op, as :meth:`pigeon.store.base.Store.apply` says.

        Raises:
            TypeError: an item is not an op; nothing was applied.
            StoreError: an op cannot be stored, the batch adds messages while
                free disk space is below ``min_free_disk``, or the commit
                failed (disk full, read-only, I/O error, ...); nothing of the
                batch was applied. The next call tries again.
            ClosedError: the store was closed.
        """
        (result,) = self.apply_many([ops])
        if isinstance(result, StoreError):
            raise result
        return result

    def apply_many(self, requests: Sequence[Sequence[Op]]) -> list[list[bool] | StoreError]:
        """Apply requests in order, in one transaction with one commit.

        A request that cannot be stored on its own (an op that does not
        encode, a put below the disk-free floor, a stored row it needs that
        fails its checksum) gets a StoreError in its place and changes
        nothing; the others are applied.

        Returns:
            Per request, its results or the StoreError that refused it.

        Raises:
            TypeError: an item is not an op; nothing was applied.
            StoreError: the transaction failed (disk full, read-only, I/O
                error, ...); nothing of the batch was applied. The next call
                tries again.
            ClosedError: the store was closed.
        """
        for ops in requests:
            check_ops(ops)
        with self._lock:
            self._check_open()
            outcomes: list[list[bool] | StoreError] = [[] for _ in requests]
            todo: list[tuple[int, list[Encoded]]] = []
            size = 0  # bytes of messages this batch writes
            for i, ops in enumerate(requests):
                if not ops:
                    continue
                try:
                    encoded = encode_request(ops)
                    length = self._check_lengths(encoded)
                except StoreError as exc:
                    self.refused_ops += len(ops)
                    outcomes[i] = self._error(str(exc), exc)
                    continue
                size += length
                todo.append((i, encoded))
            if self.min_free_disk > 0 and todo:
                todo = self._below_floor(todo, size, outcomes)
            if todo:
                for i, result in self._transaction(todo).items():
                    outcomes[i] = result
            return outcomes

    def _error(self, message: str, cause: BaseException | None = None) -> StoreError:
        if not message.startswith(f"store {self.path}"):
            message = f"store {self.path}: {message}"
        error = StoreError(message, path=self.path)
        error.__cause__ = cause
        return error

    def _check_lengths(self, encoded: list[Encoded]) -> int:
        """Bytes of messages in ``encoded``.

        Raises:
            StoreError: one is longer than SQLite stores.
        """
        size = 0
        for e in encoded:
            if len(e.blob) > self._max_length:
                raise StoreError(
                    f"cannot store {e.op.message.id!r}: {len(e.blob)} bytes stored, "  # type: ignore[union-attr]
                    f"over SQLite's limit of {self._max_length}"
                )
            size += len(e.blob)
        return size

    def _below_floor(
        self,
        todo: list[tuple[int, list[Encoded]]],
        size: int,
        outcomes: list[list[bool] | StoreError],
    ) -> list[tuple[int, list[Encoded]]]:
        """Refuse the requests that add messages while free space is below the floor.

        Free space is read (``statvfs``) at most every 0.1 s, or sooner when
        what was written since could have brought it to the floor.
        """
        now = time.monotonic()
        free = self._free
        if free is None or now - self._free_at >= _FREE_RECHECK or free - size < self.min_free_disk:
            try:
                st = os.statvfs(self._dir)
            except OSError:
                self._free = None  # cannot tell: SQLite's own error will say if it is full
                return todo
            free = st.f_bavail * st.f_frsize
            self._free_at = now
        if free >= self.min_free_disk:
            self._free = free - size
            return todo
        self._free = free
        adding = {i for i, enc in todo if any(isinstance(e.op, Put) for e in enc)}
        if not adding:
            return todo  # acks, requeues, dead letters: they free space or keep it
        message = (
            f"disk free space below the floor: {_mib(free)} free on the store's "
            f"filesystem, min_free_disk is {_mib(self.min_free_disk)}; new messages are "
            "refused until space is freed (acks are still written)"
        )
        for i, enc in todo:
            if i in adding:
                self.refused_below_floor += len(enc)
                outcomes[i] = self._error(message)
        return [(i, enc) for i, enc in todo if i not in adding]

    def _transaction(
        self, todo: list[tuple[int, list[Encoded]]]
    ) -> dict[int, list[bool] | StoreError]:
        now = self._clock()
        conn = self._conn
        out: dict[int, list[bool] | StoreError] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = self._apply_all([e for _, enc in todo for e in enc], now)
                start = 0
                for i, enc in todo:
                    out[i] = results[start : start + len(enc)]
                    start += len(enc)
            except _DATA_ERRORS:
                # One request holds something that cannot be applied: do it
                # again, each request in a savepoint, and refuse only that one.
                self._rollback()
                conn.execute("BEGIN IMMEDIATE")
                out = self._apply_requests(todo, now)
            self._prune(now)
            conn.execute(COUNT_COMMIT, (self._commits + 1,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self.write_errors += 1
            raise self._error(f"write failed: {self._explain(exc)}", exc) from exc
        except BaseException:
            self._rollback()
            self.write_errors += 1
            raise
        self._commits += 1
        self._write_record()
        return out

    def _apply_requests(
        self, todo: list[tuple[int, list[Encoded]]], now: float
    ) -> dict[int, list[bool] | StoreError]:
        out: dict[int, list[bool] | StoreError] = {}
        for i, enc in todo:
            self._conn.execute("SAVEPOINT request")
            try:
                out[i] = self._apply_all(enc, now)
            except _DATA_ERRORS as exc:
                self._conn.execute("ROLLBACK TO request")
                self.refused_ops += len(enc)
                kind = ", ".join(sorted({type(e.op).__name__ for e in enc}))
                out[i] = self._error(f"cannot apply {kind}: {type(exc).__name__}: {exc}", exc)
            self._conn.execute("RELEASE request")
        return out

    def _explain(self, exc: sqlite3.Error) -> str:
        """Name the reason of a failed write in words an operator acts on."""
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_FULL":
            return f"the disk is full ({exc})"
        if name.startswith("SQLITE_READONLY"):
            return f"the store is read-only ({exc}, {name})"
        if name.startswith("SQLITE_IOERR"):
            for path in (self.path, self.path + "-wal"):
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
                except FileNotFoundError:
                    continue
                except OSError as error:
                    return f"I/O error ({name}): {path} cannot be written: {error.strerror}"
            return f"I/O error ({exc}, {name})"
        return f"{exc} ({name})" if name else str(exc)

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            # The error being raised matters more than a failed rollback.
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _write_record(self) -> None:
        self._record.write(self._commits)

    def _apply_all(self, ops: Sequence[Encoded], now: float) -> list[bool]:
        """Apply ops in order; runs of Puts or Acks go in one statement.

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
                results += [self._apply_one(e, now) for e in run]
            start = end
        return results

    def _apply_run(self, kind: tuple[type, bool], run: Sequence[Encoded], now: float) -> bool:
        conn = self._conn
        conn.execute("SAVEPOINT run")
        before = conn.total_changes
        # Many rows per statement: executemany would step (and hand the GIL
        # back and forth) once per row, which a busy host thread makes slow.
        for chunk in _chunks(run, _ROWS_PER_STATEMENT):
            if kind[0] is Put:
                rows: list[Any] = []
                for e in chunk:
                    queue, id = e.op.queue, e.op.message.id  # type: ignore[union-attr]
                    crc = row_crc(queue, id, LIVE, e.blob, 0.0, None, None)
                    rows += (queue, id, e.blob, crc)
                values = ", ".join(["(?, ?, 0, ?, ?)"] * len(chunk))
                conn.execute(
                    "INSERT OR IGNORE INTO messages (queue, id, state, message, crc)"
                    f" VALUES {values}",
                    rows,
                )
                continue
            keys = [value for e in chunk for value in (e.op.queue, e.op.id)]  # type: ignore[union-attr]
            where = " OR ".join(["(queue = ? AND id = ?)"] * len(chunk))
            if self._window > 0 and kind[1]:
                conn.execute(f"{_TOMBSTONE} WHERE state = 0 AND ({where})", [now, now, *keys])
            else:
                conn.execute(f"DELETE FROM messages WHERE state = 0 AND ({where})", keys)
        if conn.total_changes - before == len(run):
            conn.execute("RELEASE run")
            return True
        conn.execute("ROLLBACK TO run")
        conn.execute("RELEASE run")
        return False

    def _apply_one(self, encoded: Encoded, now: float) -> bool:
        run = self._conn.execute
        op, blob = encoded
        if isinstance(op, Put):
            key = (op.queue, op.message.id)
            insert = (
                "INSERT OR IGNORE INTO messages (queue, id, state, message, crc)"
                " VALUES (?, ?, 0, ?, ?)"
            )
            row = (*key, blob, row_crc(*key, LIVE, blob, 0.0, None, None))
            if run(insert, row).rowcount:
                return True
            state, acked_at = run(
                "SELECT state, at FROM messages WHERE queue = ? AND id = ?", key
            ).fetchone()
            if state != ACKED or now - acked_at <= self._window:
                return False
            run("DELETE FROM messages WHERE queue = ? AND id = ?", key)
            run(insert, row)
            return True
        if isinstance(op, Ack):
            if self._window > 0 and op.tombstone:
                sql = f"{_TOMBSTONE} WHERE queue = ? AND id = ? AND state = 0"
                return run(sql, (now, now, op.queue, op.id)).rowcount > 0
            sql = "DELETE FROM messages WHERE queue = ? AND id = ? AND state = 0"
            return run(sql, (op.queue, op.id)).rowcount > 0
        if isinstance(op, Requeue):
            sql = (
                "UPDATE messages SET message = ?1, ready_at = ?2,"
                " crc = pigeon_crc(queue, id, state, ?1, ?2, reason, at)"
                " WHERE queue = ?3 AND id = ?4 AND state = 0"
            )
            return run(sql, (blob, float(op.ready_at), op.queue, op.message.id)).rowcount > 0
        if isinstance(op, Dead):
            key = (op.queue, op.message.id)
            # Delete and re-insert, so dead letters list in the order they died.
            sql = "DELETE FROM messages WHERE queue = ? AND id = ? AND state = 0"
            if not run(sql, key).rowcount:
                return False
            run(
                "INSERT INTO messages (queue, id, state, message, reason, at, crc)"
                " VALUES (?, ?, 1, ?, ?, ?, ?)",
                (*key, blob, op.reason, now, row_crc(*key, 1, blob, 0.0, op.reason, now)),
            )
            return True
        key = (op.queue, op.id)
        found = run(
            f"SELECT {ROW_COLUMNS}, crc FROM messages WHERE queue = ? AND id = ? AND state = 1",
            key,
        ).fetchone()
        if found is None:
            return False
        if row_crc(*found[:-1]) != found[-1]:
            raise _DamagedRow(f"the dead letter {op.id!r} of {op.queue!r} fails its checksum")
        message = decode_message(found[3])
        message.attempt = 0
        data = encode_message(message)
        run("DELETE FROM messages WHERE queue = ? AND id = ?", key)
        run(
            "INSERT INTO messages (queue, id, state, message, crc) VALUES (?, ?, 0, ?, ?)",
            (*key, data, row_crc(*key, LIVE, data, 0.0, None, None)),
        )
        return True

    def _prune(self, now: float) -> None:
        # Lazy: at most every half window, inside a write that is happening anyway.
        if self._window > 0 and now - self._last_prune >= self._window / 2:
            cutoff = now - self._window
            self._conn.execute("DELETE FROM messages WHERE state = 2 AND at < ?", (cutoff,))
            self._last_prune = now

    # -- reading ---------------------------------------------------------

    def _verified(self, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``rows`` (seq, columns..., crc) if every one checks out.

        Raises:
            StoreError: some fail their checksum; none is dropped silently.
        """
        bad = []
        for row in rows:
            try:
                ok = row_crc(*row[1:-1]) == row[-1]
            except (TypeError, ValueError):
                ok = False
            if not ok:
                bad.append(row)
        if bad:
            first = bad[0]
            raise self._error(
                f"{len(bad)} stored row(s) fail their checksum (first: seq {first[0]}, "
                f"id {first[2]!r} of queue {first[1]!r}); nothing was dropped: reopen the "
                "store with salvage=True to move them to its quarantine table"
            )
        return list(rows)

    def load(self) -> list[StoredMessage]:
        """Return every live message in insertion order, each verified.

        Raises:
            StoreError: the store could not be read, or a row fails its
                checksum or does not decode.
            ClosedError: the store was closed.
        """
        sql = f"SELECT seq, {ROW_COLUMNS}, crc FROM messages WHERE state = 0 ORDER BY seq"
        with self._lock, translate(self.path, "load"):
            self._check_open()
            rows = self._verified(self._conn.execute(sql).fetchall())
            return [StoredMessage(row[1], decode_message(row[4]), row[5]) for row in rows]

    def page(self, queue: str, after: int, *, limit: int, max_bytes: int) -> Page:
        """Return live messages of ``queue`` after position ``after``, each verified.

        See :meth:`pigeon.store.base.Store.page`. The scan walks the rows in
        insertion order from ``after`` (the primary key), so a host that
        moves its position along reads each row once.

        Raises:
            StoreError: the store could not be read, or a row fails its
                checksum or does not decode.
            ClosedError: the store was closed.
        """
        sql = (
            f"SELECT seq, {ROW_COLUMNS}, crc FROM messages"
            " WHERE seq > ? AND queue = ? AND state = 0 ORDER BY seq"
        )
        rows: list[tuple[Any, ...]] = []
        more = False
        size = 0
        with self._lock, translate(self.path, "page"):
            self._check_open()
            cursor = self._conn.execute(sql, (after, queue))
            try:
                for row in cursor:
                    if len(rows) >= limit or (rows and size >= max_bytes):
                        more = True
                        break
                    rows.append(row)
                    size += len(row[4])
            finally:
                cursor.close()
            found = [
                (row[0], StoredMessage(row[1], decode_message(row[4]), row[5]))
                for row in self._verified(rows)
            ]
        return Page(found, more)

    def position(self) -> int:
        """The position of the latest row written (0 for an empty store).

        Raises:
            StoreError: the store could not be read.
            ClosedError: the store was closed.
        """
        with self._lock, translate(self.path, "read the position"):
            self._check_open()
            found = self._conn.execute("SELECT max(seq) FROM messages").fetchone()[0]
        return int(found or 0)

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """Return the dead letters, of one queue or all, in the order they died.

        Raises:
            StoreError: the store could not be read, or a row fails its
                checksum or does not decode.
            ClosedError: the store was closed.
        """
        sql = f"SELECT seq, {ROW_COLUMNS}, crc FROM messages WHERE state = 1"
        args: tuple[str, ...] = ()
        if queue is not None:
            sql, args = sql + " AND queue = ?", (queue,)
        with self._lock, translate(self.path, "read dead letters"):
            self._check_open()
            rows = self._verified(self._conn.execute(sql + " ORDER BY seq", args).fetchall())
            return [DeadLetter(row[1], decode_message(row[4]), row[6], row[7]) for row in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """Return ``{queue: {"ready": n, "dead": m}}`` for every non-empty queue.

        Raises:
            StoreError: the store could not be read.
            ClosedError: the store was closed.
        """
        sql = "SELECT queue, state, count(*) FROM messages WHERE state < 2 GROUP BY queue, state"
        counts: dict[str, dict[str, int]] = {}
        with self._lock, translate(self.path, "count"):
            self._check_open()
            for queue, state, n in self._conn.execute(sql):
                entry = counts.setdefault(queue, {"ready": 0, "dead": 0})
                entry["ready" if state == LIVE else "dead"] = n
        return counts

    def stats(self) -> dict[str, Any]:
        """Return the store's counters.

        Keys: ``commits`` (write transactions ever), ``write_errors`` (failed
        transactions), ``refused_ops`` (ops refused because they could not be
        stored), ``refused_below_floor`` (puts refused by ``min_free_disk``),
        ``min_free_disk``, ``free_disk`` (bytes, as last measured; None if
        not yet or unknown), ``quarantined`` (rows in the quarantine table),
        ``lost_in_os_crash`` (commits a ``synchronous="normal"`` run lost when
        the machine stopped, found at open) and ``salvage`` (the report, or
        None).
        """
        with self._lock:
            return {
                "commits": self._commits,
                "write_errors": self.write_errors,
                "refused_ops": self.refused_ops,
                "refused_below_floor": self.refused_below_floor,
                "min_free_disk": self.min_free_disk,
                "free_disk": self._free,
                "quarantined": self._quarantined,
                "lost_in_os_crash": self.lost_in_os_crash,
                "salvage": self.salvage_report,
            }

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
                with translate(self.path, "close"):
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
