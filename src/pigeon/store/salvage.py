"""Checking a store file before it is used, and salvaging a damaged one.

:func:`inspect` runs on a read-only connection, so a file that fails is left
exactly as it was (closing a read-only connection never checkpoints the WAL,
which would fold the frames SQLite accepted into the database and delete
the rest). :func:`salvage` never edits the damaged files either: it copies
them aside, builds the best image it can in a work directory (the database
plus its WAL, repaired when commits are missing), copies every row that
checks out into a new store, puts the rest in its ``quarantine`` table, and
only then moves the new store into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import StoreError
from .base import decode_message
from .integrity import CommitRecord, boot_id, repair_wal, row_crc
from .schema import (
    ACKED,
    DEAD,
    LIVE,
    ROW_COLUMNS,
    connect,
    create,
    format_of,
    fsync_path,
    read_meta,
    set_sequence,
)

log = logging.getLogger("pigeon.store")

_SHOWN = 3  # examples named in an error message


@dataclass
class Findings:
    """What :func:`inspect` found wrong with a store file."""

    path: str
    truncated: str = ""
    structure: list[str] = field(default_factory=list)  # quick_check and read errors
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    missing_commits: int = 0
    expected_commits: int = 0
    found_commits: int = 0
    lost_in_os_crash: int = 0  # synchronous="normal" after the machine restarted: allowed
    version: int = 0
    store_id: str | None = None
    commits: int = 0

    @property
    def damaged(self) -> bool:
        return bool(self.truncated or self.structure or self.bad_rows or self.missing_commits)

    def describe(self) -> str:
        parts = []
        if self.truncated:
            parts.append(self.truncated)
        if self.structure:
            shown = "; ".join(self.structure[:_SHOWN])
            parts.append(f"{len(self.structure)} problem(s) in its structure ({shown})")
        if self.bad_rows:
            shown = ", ".join(self.bad_examples[:_SHOWN])
            parts.append(f"{self.bad_rows} row(s) fail their checksum ({shown})")
        if self.missing_commits:
            parts.append(
                f"{self.missing_commits} committed write(s) are missing: the last run "
                f"committed {self.expected_commits}, the file holds {self.found_commits} "
                "(its WAL was damaged, deleted or replaced, or the file is an older copy)"
            )
        return "; ".join(parts)


def check_row(row: tuple[Any, ...], version: int) -> str:
    """Why a row of ``messages`` (seq, columns..., crc) cannot be trusted, or ""."""
    seq, queue, id, state, message, ready_at, reason, at, crc = row
    try:
        if version >= 2:
            if row_crc(queue, id, state, message, ready_at, reason, at) != crc:
                return "checksum mismatch"
        elif state in (LIVE, DEAD):
            decode_message(message)  # format 1 has no checksum: the best check there is
        if not isinstance(queue, str) or not isinstance(id, str):
            return "bad key"
        if state not in (LIVE, DEAD, ACKED):
            return f"unknown state {state!r}"
    except Exception as exc:  # a column of the wrong type, bytes that do not decode
        return f"unreadable ({type(exc).__name__})"
    return ""


_ROWS = f"SELECT seq, {ROW_COLUMNS}, crc FROM messages"
_ROWS_V1 = f"SELECT seq, {ROW_COLUMNS}, 0 FROM messages"


def inspect(path: str, record: CommitRecord | None, *, truncated: str = "") -> Findings:
    """Check the store at ``path`` without changing it.

    The check runs on a read-only connection. When that cannot make its WAL
    index (the disk is full), it runs on a writing connection instead: in
    this process if there is no WAL to lose, else in a child process that
    exits without closing it, since closing would checkpoint the WAL.

    Raises:
        StoreError: the file is not a pigeon store (another application's, a
            newer format, not SQLite at all); salvage cannot help there.
    """
    try:
        try:
            return _inspect(path, record, truncated, read_only=True)
        except _NoWalIndex:
            wal = path + "-wal"
            if os.path.exists(wal) and os.path.getsize(wal) > 0:
                return _inspect_in_child(path, record, truncated)
            return _inspect(path, record, truncated, read_only=False)
    finally:
        with contextlib.suppress(OSError):  # the read-only connection's WAL index
            os.remove(path + "-shm")


class _NoWalIndex(Exception):
    """A read-only connection could not read the WAL (no room for its index)."""


# A connection the child process must never close (see _child).
_kept: list[sqlite3.Connection] = []


def _inspect(
    path: str, record: CommitRecord | None, truncated: str, *, read_only: bool, keep: bool = False
) -> Findings:
    findings = Findings(path, truncated=truncated)
    try:
        conn = connect(path, read_only=read_only)
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: open failed: {exc}", path=path) from exc
    if keep:
        _kept.append(conn)  # not even garbage collection may close it
    with contextlib.nullcontext() if keep else contextlib.closing(conn):
        try:
            problems = [
                line.strip()
                for row in conn.execute("PRAGMA quick_check")
                for line in str(row[0]).splitlines()
                if line.strip() and not line.startswith("*** in database")
            ]
            if problems != ["ok"]:
                findings.structure += problems
            findings.version, has_tables = format_of(conn, path)
        except sqlite3.OperationalError as exc:
            if read_only:
                raise _NoWalIndex(str(exc)) from exc
            raise StoreError(f"store {path}: open failed: {exc}", path=path) from exc
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_CORRUPT" or truncated:
                if truncated:
                    return findings
                raise StoreError(f"store {path}: open failed: {exc}", path=path) from exc
            findings.structure.append(str(exc))
            return findings
        if not has_tables:
            if record is not None and record.commits > 0:
                findings.missing_commits = findings.expected_commits = record.commits
            return findings
        if findings.version >= 2:
            try:
                findings.store_id, findings.commits = read_meta(conn)
            except (sqlite3.Error, ValueError) as exc:
                findings.structure.append(f"meta: {exc}")
        _check_commits(findings, record)
        _check_rows(conn, findings)
    return findings


def _inspect_in_child(path: str, record: CommitRecord | None, truncated: str) -> Findings:
    """:func:`_inspect` on a writing connection in a child that never closes it."""
    import pigeon

    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(pigeon.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    args = json.dumps({"path": path, "record": record, "truncated": truncated})
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from pigeon.store.salvage import _child; _child()", args],
            capture_output=True,
            text=True,
            env=env,
            timeout=3600,
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise StoreError(f"store {path}: the check could not run: {exc}", path=path) from exc
    if "error" in answer:
        raise StoreError(answer["error"], path=path)
    return Findings(**answer)


def _child() -> None:
    args = json.loads(sys.argv[1])
    record = CommitRecord(*args["record"]) if args["record"] else None
    try:
        findings = _inspect(args["path"], record, args["truncated"], read_only=False, keep=True)
        answer = asdict(findings)
    except StoreError as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)
    os._exit(0)  # no close, so no checkpoint: the WAL stays as it was


def _check_commits(findings: Findings, record: CommitRecord | None) -> None:
    if record is None or findings.store_id is None or record.store_id != findings.store_id:
        return  # no record of this store (format 1, a copied file, an older pigeon)
    missing = record.commits - findings.commits
    if missing <= 0:
        return  # the record lags after a crash between commit and record: expected
    restarted = not record.boot or record.boot != boot_id()
    if record.mode == "normal" and restarted:
        # synchronous="normal" may lose its last commits in an OS crash.
        findings.lost_in_os_crash = missing
        return
    findings.missing_commits = missing
    findings.expected_commits, findings.found_commits = record.commits, findings.commits


def _check_rows(conn: sqlite3.Connection, findings: Findings) -> None:
    sql = _ROWS if findings.version >= 2 else _ROWS_V1
    try:
        for row in conn.execute(sql):
            why = check_row(row, findings.version)
            if why:
                findings.bad_rows += 1
                if len(findings.bad_examples) < _SHOWN:
                    findings.bad_examples.append(f"seq {row[0]}: {why}")
    except sqlite3.DatabaseError as exc:
        findings.structure.append(f"reading the rows: {exc}")


# -- salvage -------------------------------------------------------------------


def salvage(
    path: str, findings: Findings, record: CommitRecord | None, clock: float
) -> dict[str, Any]:
    """Replace the damaged store at ``path`` by one holding what checks out.

    The damaged files are kept as ``<path>.damaged-<time>`` (and ``-wal``).

    Returns:
        The report: what was kept, quarantined, brought back and lost.

    Raises:
        StoreError: the salvage itself failed (for example the disk is full);
            the damaged files are then as they were.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(clock))
    kept = f"{path}.damaged-{stamp}"
    work = f"{path}.salvage-{stamp}"
    wal = path + "-wal"
    report: dict[str, Any] = {
        "damage": findings.describe(),
        "kept_as": kept,
        "rows_kept": 0,
        "quarantined": 0,
        "unreadable_ranges": [],
        "missing_commits": findings.missing_commits,
        "recovered_commits": 0,
        "skipped_wal_frames": 0,
    }
    try:
        os.makedirs(work)
        # 1. The damaged files, as they are, for whoever looks into it later.
        _copy(path, kept)
        if os.path.exists(wal):
            _copy(wal, kept + "-wal")
        # 2. The image to read from: a copy, and its WAL (repaired if it can be).
        image = os.path.join(work, "image.db")
        _copy(path, image)
        if os.path.exists(wal):
            with open(wal, "rb") as file:
                data = file.read()
            repaired = repair_wal(data, findings.missing_commits)
            if repaired is not None:
                data = repaired.wal
                report["recovered_commits"] = repaired.commits
                report["skipped_wal_frames"] = repaired.skipped_frames
            with open(image + "-wal", "wb") as file:
                file.write(data)
        # 3. A new store with every row that checks out.
        fresh = os.path.join(work, "new.db")
        _rebuild(image, fresh, findings, record, report, clock)
        fsync_path(fresh)
        # 4. Into place. The old WAL goes first: next to the new file it would
        # be read as part of it.
        for leftover in (wal, path + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        os.replace(fresh, path)
        fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"store {path}: salvage failed: {exc}", path=path) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.warning(
        "store %s salvaged: %s; kept %d rows, quarantined %d, unreadable seq ranges %s; "
        "%d of %d missing commits brought back; the damaged files are kept as %s",
        path,
        report["damage"],
        report["rows_kept"],
        report["quarantined"],
        report["unreadable_ranges"] or "none",
        report["recovered_commits"],
        report["missing_commits"],
        kept,
    )
    return report


def _copy(source: str, target: str) -> None:
    shutil.copyfile(source, target)
    os.chmod(target, 0o600)
    fsync_path(target)


def _rebuild(
    image: str,
    fresh: str,
    findings: Findings,
    record: CommitRecord | None,
    report: dict[str, Any],
    clock: float,
) -> None:
    old = connect(image)
    new = connect(fresh)
    try:
        version, store_id, commits, high_seq = findings.version or 1, findings.store_id, 0, 0
        with contextlib.suppress(sqlite3.Error, StoreError):
            version = format_of(old, image)[0] or version
        with contextlib.suppress(sqlite3.Error, ValueError):
            store_id, commits = read_meta(old)
        with contextlib.suppress(sqlite3.Error, TypeError):
            high_seq = old.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
            ).fetchone()[0]
        if record is not None and (store_id is None or record.store_id == store_id):
            # Keep counting where the last run left off: the record and the
            # new file agree from here on.
            store_id, commits = record.store_id, max(commits, record.commits)
        new.execute("PRAGMA journal_mode=WAL")
        create(new, store_id=store_id, commits=commits)
        new.execute("BEGIN IMMEDIATE")
        rows, unreadable = _read_rows(old, version)
        newest: dict[tuple[Any, Any], tuple[Any, ...]] = {}
        quarantined: set[tuple[Any, Any]] = set()
        for row in rows:  # in seq order
            why = check_row(row, version)
            if why:
                _quarantine(new, row, why, clock)
                quarantined.add((row[1], row[2]))
                report["quarantined"] += 1
                continue
            older = newest.get((row[1], row[2]))
            newest[row[1], row[2]] = row if version >= 2 else (*row[:-1], row_crc(*row[1:-1]))
            if older is not None:
                # Two intact copies of one key: a page from before the damage
                # next to a later one. The later (higher seq) is the state.
                _quarantine(new, older, "an older copy of a row kept under a later seq", clock)
                report["quarantined"] += 1
        good = sorted(newest.values())
        new.executemany(
            f"INSERT INTO messages (seq, {ROW_COLUMNS}, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            good,
        )
        report["rows_kept"] = len(good)
        # Keys the (queue, id) index names but whose row is gone: an
        # unreadable page, or a page older than the index (a damaged later
        # copy of it was left out). The message is lost; its id is not.
        seen = set(newest) | quarantined
        lost = [key for key in _index_keys(old) if (key[1], key[2]) not in seen]
        for seq, queue, id in lost:
            row = (seq, queue, id, None, None, None, None, None, None)
            _quarantine(new, row, "lost: its row is gone, its key was left in the index", clock)
        report["quarantined"] += len(lost)
        report["unreadable_ranges"] = [[start, end] for start, end in unreadable]
        with contextlib.suppress(sqlite3.Error):  # rows from an earlier salvage
            earlier = old.execute(
                f"SELECT seq, {ROW_COLUMNS}, crc, why, found_at FROM quarantine"
            ).fetchall()
            new.executemany(
                f"INSERT INTO quarantine (seq, {ROW_COLUMNS}, crc, why, found_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                earlier,
            )
        # New rows go after every seq the damaged store ever used.
        set_sequence(new, "messages", max([high_seq or 0, *(row[0] for row in good)]))
        new.execute("COMMIT")
        new.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        old.close()
        new.close()


def _quarantine(conn: sqlite3.Connection, row: tuple[Any, ...], why: str, now: float) -> None:
    # Values go in as found; a type SQLite cannot bind is kept as its repr.
    values = [v if v is None or isinstance(v, (int, float, str, bytes)) else repr(v) for v in row]
    conn.execute(
        f"INSERT INTO quarantine (seq, {ROW_COLUMNS}, crc, why, found_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*values, why, now),
    )


_CHUNK = 512


def _read_rows(
    conn: sqlite3.Connection, version: int
) -> tuple[list[tuple[Any, ...]], list[tuple[int, int | None]]]:
    """Every row that can be read, in order, and the seq ranges that cannot.

    A damaged page fails the query that touches it; the scan goes on after
    it by seeking further and further ahead (then back, to the first seq
    that reads), so one bad page costs the rows on it and no others.
    """
    sql = (_ROWS if version >= 2 else _ROWS_V1) + " WHERE seq > ? ORDER BY seq LIMIT ?"
    rows: list[tuple[Any, ...]] = []
    unreadable: list[tuple[int, int | None]] = []
    try:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError:
        names = {"messages"}  # the schema itself is damaged: try anyway
    if "messages" not in names:
        return rows, unreadable  # an empty file: nothing to read, nothing lost here
    last = 0
    while True:
        try:
            chunk = conn.execute(sql, (last, _CHUNK)).fetchall()
        except sqlite3.DatabaseError:
            chunk = []
            try:  # read row by row up to the damage
                while True:
                    one = conn.execute(sql, (last, 1)).fetchall()
                    if not one:
                        return rows, unreadable
                    rows += one
                    last = one[0][0]
            except sqlite3.DatabaseError:
                pass
            after = _next_readable(conn, sql, last)
            if after is None:
                unreadable.append((last + 1, None))
                return rows, unreadable
            after = max(after, last + 2)  # always move on
            unreadable.append((last + 1, after - 1))
            last = after - 1
            continue
        if not chunk:
            return rows, unreadable
        rows += chunk
        last = chunk[-1][0]


def _next_readable(conn: sqlite3.Connection, sql: str, last: int) -> int | None:
    """The lowest seq after ``last`` from which rows read again, or None."""

    def reads(start: int) -> bool:
        try:
            conn.execute(sql, (start - 1, 1)).fetchall()
        except sqlite3.DatabaseError:
            return False
        return True

    step = 1
    while not reads(last + step):
        step *= 2
        if step > 1 << 62:
            return None
    low, high = last + step // 2 + 1, last + step  # reads(high); not reads(last + step // 2)
    if step == 1:
        return last + 1
    while low < high:
        middle = (low + high) // 2
        if reads(middle):
            high = middle
        else:
            low = middle + 1
    return high


def _index_keys(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    """(seq, queue, id) of every key the (queue, id) index holds, as far as
    it can be read; it is a b-tree of its own, often intact when rows are not."""
    found: list[tuple[int, str, str]] = []
    with contextlib.suppress(sqlite3.Error):
        cursor = conn.execute(
            "SELECT seq, queue, id FROM messages INDEXED BY sqlite_autoindex_messages_1"
            " WHERE queue IS NOT NULL"
        )
        for seq, queue, id in cursor:
            found.append((seq, queue, id))
    return sorted(found)
