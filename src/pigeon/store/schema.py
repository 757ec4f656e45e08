"""The SQLite store's file format: tables, format versions, and how it is opened.

Format 2 adds to format 1 a checksum per row (``messages.crc``), the
``meta`` table (the store's id), a commit count (in ``sqlite_sequence``)
and the ``quarantine`` table (rows salvage could not vouch for). Format 3
(this one) adds the ``live_rows`` index, so a host reads one queue's
backlog back in order without scanning other queues' rows. An older store
is migrated in one transaction when it is opened, after it passed its
checks: a format-1 store's rows get checksums of what they hold then.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec

from ..errors import StoreError
from .integrity import sql_row_crc

LIVE, DEAD, ACKED = 0, 1, 2
# Marks a file as a pigeon store, so opening some other SQLite file is refused
# instead of adding tables to it.
APPLICATION_ID = 0x5047_4E31  # "PGN1"
SCHEMA_VERSION = 3

MESSAGES = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    state INTEGER NOT NULL,                 -- 0 live, 1 dead, 2 acked tombstone
    message BLOB NOT NULL,                  -- msgpack Message; empty for tombstones
    ready_at REAL NOT NULL DEFAULT 0,
    reason TEXT,                            -- why it died
    at REAL,                                -- died_at, or acked_at for tombstones
    crc INTEGER NOT NULL DEFAULT 0,         -- integrity.row_crc of the other columns
    UNIQUE (queue, id)
);
-- Only tombstones are indexed by time, so pruning is cheap and puts pay nothing.
CREATE INDEX tombstones ON messages (at) WHERE state = 2;
"""

# What format 3 adds to format 2: a queue's live rows in insertion order.
LIVE_ROWS = "CREATE INDEX live_rows ON messages (queue, seq) WHERE state = 0"

# Tables format 2 adds to format 1.
EXTRA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE quarantine (                   -- rows salvage could not vouch for
    seq INTEGER,                            -- the row's place in the damaged store
    queue, id, state, message, ready_at, reason, at, crc,  -- as found (may be NULL)
    why TEXT NOT NULL,
    found_at REAL NOT NULL
);
"""

# Every column of a row but seq and crc, in row_crc's order.
ROW_COLUMNS = "queue, id, state, message, ready_at, reason, at"
CRC_SQL = f"pigeon_crc({ROW_COLUMNS})"

SYNC_MODES = {"full": "FULL", "normal": "NORMAL"}


@contextlib.contextmanager
def translate(path: str, doing: str) -> Iterator[None]:
    """Turn sqlite3 (and stored-data decode) errors into StoreError."""
    try:
        yield
    except (sqlite3.Error, msgspec.DecodeError) as exc:
        raise StoreError(f"store {path}: {doing} failed: {exc}", path=path) from exc


def connect(path: str, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection with pigeon's SQL functions.

    ``read_only`` never writes the database or its WAL, and closing it never
    checkpoints; it needs a ``-shm`` file for the WAL index (SQLite cannot
    read a WAL read-only without one), which the caller removes afterwards.
    """
    if read_only:
        uri = Path(path).absolute().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        # check_same_thread=False: the store's own lock serialises every use.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if not read_only:
            # One process has a store open (the flock on .lock says so), so
            # it may hold the file locks for good. In WAL mode that also keeps
            # the WAL index in memory instead of in a -shm file: no file to
            # grow (on a full disk the store could not open otherwise).
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.create_function("pigeon_crc", 7, sql_row_crc, deterministic=True)
    except BaseException:
        conn.close()
        raise
    return conn


def format_of(conn: sqlite3.Connection, path: str) -> tuple[int, bool]:
    """The store's format version and whether it has tables at all.

    Raises:
        StoreError: it is another application's SQLite file, or a newer format.
        sqlite3.Error: the file cannot be read.
    """
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
    if has_tables and app_id != APPLICATION_ID:
        raise StoreError(f"{path} is an SQLite file but not a pigeon store", path=path)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has format {version}, newer than this pigeon "
            f"understands ({SCHEMA_VERSION})",
            path=path,
        )
    return version, has_tables


# The commit count lives in sqlite_sequence, next to the row AUTOINCREMENT
# keeps for messages: a put rewrites that page anyway, so counting costs it
# nothing (a row of meta would be one more page per commit). SQLite allows
# ordinary writes to sqlite_sequence; a row naming no table is left alone.
COMMITS_ROW = "pigeon_commits"
COUNT_COMMIT = f"UPDATE sqlite_sequence SET seq = ? WHERE name = '{COMMITS_ROW}'"


def read_meta(conn: sqlite3.Connection) -> tuple[str, int]:
    """(store id, commits) of a format-2 store.

    Raises:
        sqlite3.Error: the tables cannot be read.
        ValueError: they do not hold what they must.
    """
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    counted = conn.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = ?", (COMMITS_ROW,)
    ).fetchall()
    store_id = meta.get("store_id")
    commits = counted[0][0] if len(counted) == 1 else None
    if not isinstance(store_id, str) or not isinstance(commits, int) or commits < 0:
        raise ValueError(f"the store's id or commit count is damaged: {meta!r}, {counted!r}")
    bytes.fromhex(store_id)
    return store_id, commits


def create(conn: sqlite3.Connection, *, store_id: str | None = None, commits: int = 1) -> None:
    """Make an empty store in one transaction: a crash leaves either no
    tables or a marked store.

    Every transaction that writes the WAL counts as a commit, this one
    included: salvage relies on WAL commits and the count agreeing.
    """
    conn.executescript(
        f"BEGIN IMMEDIATE; {MESSAGES} {EXTRA} {LIVE_ROWS};"
        f" PRAGMA application_id={APPLICATION_ID};"
        f" PRAGMA user_version={SCHEMA_VERSION};"
    )
    try:
        _fill_meta(conn, store_id, commits)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring an older format up to this one, in one transaction (one commit)."""
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version == 1:  # no checksums, no meta, no quarantine
            conn.execute("ALTER TABLE messages ADD COLUMN crc INTEGER NOT NULL DEFAULT 0")
            conn.execute(f"UPDATE messages SET crc = {CRC_SQL}")
            # one statement at a time: executescript would commit the transaction first
            for statement in EXTRA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            _fill_meta(conn, None, 1)  # this transaction is the first commit counted
        else:  # format 2: this transaction is one more commit
            _, commits = read_meta(conn)
            set_sequence(conn, COMMITS_ROW, commits + 1)
        conn.execute(LIVE_ROWS)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _fill_meta(conn: sqlite3.Connection, store_id: str | None, commits: int) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('store_id', ?)",
        (store_id or uuid.uuid4().hex,),
    )
    set_sequence(conn, COMMITS_ROW, commits)


def set_sequence(conn: sqlite3.Connection, name: str, value: int) -> None:
    """Set a row of sqlite_sequence (which has no key to upsert on)."""
    if not conn.execute(
        "UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (value, name)
    ).rowcount:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (name, value))


def fsync_path(path: str, *, directory: bool = False) -> None:
    """fsync a file (or a directory, after a rename in it)."""
    fd = os.open(path, (os.O_RDONLY if directory else os.O_RDWR) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
