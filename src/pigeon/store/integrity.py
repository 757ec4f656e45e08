"""How a SQLite store notices damage, and what salvage keeps.

Three checks, each for a kind of damage SQLite's own checks miss or hide:

- **Row checksums.** Every row carries a CRC32 of its content
  (:func:`row_crc`), written with the row and verified when rows are read
  back. ``PRAGMA quick_check`` checks the file's structure, not what the rows
  say; a checksum notices a row whose bytes changed.
- **The commit count.** Every write transaction adds one to a counter in the
  database (table ``meta``) and, once it has committed, writes the new count
  to a small record in the store's ``.lock`` file (:class:`CommitRecord`).
  SQLite reads a WAL only up to the first frame whose checksum fails and
  ignores everything after it without an error, committed transactions
  included; a deleted or replaced WAL or database file is not an error
  either. If the database then holds fewer commits than the record says were
  made, committed data is missing, and opening says so.
- **WAL repair for salvage** (:func:`repair_wal`). Frames after a damaged
  one are still checked against their own predecessor's stored checksum;
  the ones that pass are chained again so SQLite reads them, up to the number
  of commits the record says are missing. What that brings back is checked
  row by row like everything else.

The record is written without an fsync (it costs one ``pwrite`` per commit):
after a process crash it is exact, since the operating system still had every
write. After an OS crash or power cut it may be older than the database
(never newer with ``synchronous="full"``, whose commits are fsynced before
the record is written); with ``synchronous="normal"`` the database itself may
legitimately have lost its last commits, so a shortfall after the machine
restarted (a new boot id) is reported, not refused.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "CommitRecord",
    "RecordWriter",
    "boot_id",
    "read_record",
    "repair_wal",
    "row_crc",
    "write_record",
]

_crc_encoder = msgspec.msgpack.Encoder()


def row_crc(
    queue: Any,
    id: Any,
    state: Any,
    message: Any,
    ready_at: Any,
    reason: Any,
    at: Any,
) -> int:
    """The checksum of one stored row (every column but ``seq`` and ``crc``).

    Raises:
        TypeError: a column holds a value of a type no row ever has (which
            is damage too, and the callers treat it so).
    """
    head = _crc_encoder.encode(
        (queue, id, state, float(ready_at), reason, None if at is None else float(at))
    )
    return zlib.crc32(message, zlib.crc32(head))


def sql_row_crc(
    queue: Any, id: Any, state: Any, message: Any, ready_at: Any, reason: Any, at: Any
) -> int | None:
    """:func:`row_crc` as an SQL function; NULL for values no row can hold."""
    try:
        return row_crc(queue, id, state, message, ready_at, reason, at)
    except (TypeError, ValueError):
        return None


# -- the commit record in the lock file ---------------------------------------

RECORD_OFFSET = 32  # the lock file's first 32 bytes hold the holder's pid
_RECORD = struct.Struct(">8s16sQ1s16sI")  # magic, store id, commits, mode, boot id, crc
_MAGIC = b"PGNCMT1\n"


class CommitRecord(NamedTuple):
    """What the last writer of a store said it had committed.

    Attributes:
        store_id: the store's id (hex), so a record of another store is ignored.
        commits: write transactions committed, ever.
        mode: the writer's ``synchronous`` mode, ``"full"`` or ``"normal"``.
        boot: the boot id of the machine when it wrote this, "" if unknown.
    """

    store_id: str
    commits: int
    mode: str
    boot: str


def read_record(fd: int) -> CommitRecord | None:
    """The record in the lock file ``fd``, or None if there is none (or it is garbled)."""
    try:
        data = os.pread(fd, _RECORD.size, RECORD_OFFSET)
    except OSError:
        return None
    if len(data) != _RECORD.size:
        return None
    magic, store_id, commits, mode, boot, crc = _RECORD.unpack(data)
    if magic != _MAGIC or zlib.crc32(data[:-4]) != crc:
        return None
    known = boot != bytes(len(boot))
    return CommitRecord(
        store_id.hex(), commits, "normal" if mode == b"N" else "full", boot.hex() if known else ""
    )


def pack_record(record: CommitRecord) -> bytes:
    """The bytes :func:`write_record` writes for ``record``."""
    body = _RECORD.pack(
        _MAGIC,
        bytes.fromhex(record.store_id),
        record.commits,
        b"N" if record.mode == "normal" else b"F",
        bytes.fromhex(record.boot) if record.boot else bytes(16),
        0,
    )[:-4]
    return body + struct.pack(">I", zlib.crc32(body))


def write_record(fd: int, record: CommitRecord) -> bool:
    """Write ``record`` into the lock file ``fd`` (no fsync); False if it failed."""
    try:
        os.pwrite(fd, pack_record(record), RECORD_OFFSET)
    except OSError:
        return False  # the record stays older than the database: never a false alarm
    return True


class RecordWriter:
    """Writes one store's record after every commit: one ``pwrite``, no fsync."""

    def __init__(self, fd: int, store_id: str, mode: str) -> None:
        packed = pack_record(CommitRecord(store_id, 0, mode, boot_id()))
        self._fd = fd
        self._head, self._tail = packed[:24], packed[32:-4]

    def write(self, commits: int) -> bool:
        """Record ``commits``; False if the write failed (the record then lags)."""
        body = self._head + commits.to_bytes(8, "big") + self._tail
        try:
            os.pwrite(self._fd, body + zlib.crc32(body).to_bytes(4, "big"), RECORD_OFFSET)
        except OSError:
            return False
        return True


_boot: str | None = None


def boot_id() -> str:
    """This boot of the machine (Linux), as 32 hex digits; "" where unknown."""
    global _boot
    if _boot is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as file:
                text = file.read().strip().replace("-", "")
            _boot = text if len(text) == 32 and int(text, 16) >= 0 else ""
        except (OSError, ValueError):
            _boot = ""
    return _boot


# -- the WAL -------------------------------------------------------------------

_WAL_MAGIC = (0x377F0682, 0x377F0683)  # little- and big-endian checksums
_FRAME_HEADER = 24


def _checksum(data: bytes, chain: tuple[int, int], big: bool) -> tuple[int, int]:
    """SQLite's WAL checksum (wal.c: walChecksumBytes), continued from ``chain``."""
    s0, s1 = chain
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & mask
        s1 = (s1 + words[i + 1] + s0) & mask
    return s0, s1


class WalRepair(NamedTuple):
    """What :func:`repair_wal` made of a damaged WAL.

    Attributes:
        wal: the repaired WAL, to be read by SQLite instead of the damaged one.
        commits: committed transactions brought back from beyond the damage.
        skipped_frames: frames beyond the damage left out because they do
            not check out (the damaged ones, and any whose predecessor's
            checksum was damaged too).
    """

    wal: bytes
    commits: int
    skipped_frames: int


def repair_wal(data: bytes, missing_commits: int) -> WalRepair | None:
    """Bring back up to ``missing_commits`` commits SQLite stops short of.

    SQLite reads a WAL frame by frame and stops, silently, at the first one
    whose salt or cumulative checksum does not match (wal.c,
    ``walIndexRecover``); transactions committed after that point are not
    seen. Here every later frame of the same WAL generation (same salts) is
    checked against its own predecessor's *stored* checksum instead: one that
    passes was written whole by SQLite, one that fails is left out. The
    frames kept are chained with fresh checksums, so SQLite reads them all,
    up to the ``missing_commits``-th commit frame beyond the damage (never
    further: frames past that are not known to be committed).

    Returns:
        The repaired WAL, or None when nothing can be brought back (the WAL
        header is damaged, or no commit frame beyond the damage checks out).
    """
    if len(data) < 32 or missing_commits <= 0:
        return None
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    if magic not in _WAL_MAGIC or page_size & (page_size - 1) or not 512 <= page_size <= 65536:
        return None
    big = magic == _WAL_MAGIC[1]
    if _checksum(data[:24], (0, 0), big) != (c1, c2):
        return None  # which frames are current is unknowable without the salts
    size = _FRAME_HEADER + page_size
    count = (len(data) - 32) // size

    def frame(i: int) -> tuple[bytes, bytes]:
        start = 32 + i * size
        return data[start : start + _FRAME_HEADER], data[start + _FRAME_HEADER : start + size]

    def stored(header: bytes) -> tuple[int, int]:
        s0, s1 = struct.unpack(">II", header[16:24])
        return s0, s1

    # SQLite's own reading: the valid prefix, and its last commit frame.
    chain, committed, valid_chain = (c1, c2), 0, (c1, c2)
    for i in range(count):
        header, page = frame(i)
        if struct.unpack(">II", header[8:16]) != (salt1, salt2) or header[:4] == bytes(4):
            break  # page 0 does not exist: SQLite (walDecodeFrame) stops here too
        chain = _checksum(header[:8] + page, chain, big)
        if chain != stored(header):
            break
        if struct.unpack(">I", header[4:8])[0]:
            committed, valid_chain = i + 1, chain

    kept: list[int] = []
    skipped: list[int] = []
    commits = end = 0
    for i in range(committed, count):
        header, page = frame(i)
        previous = stored(frame(i - 1)[0]) if i > 0 else (c1, c2)
        current = struct.unpack(">II", header[8:16]) == (salt1, salt2) and header[:4] != bytes(4)
        if not current or _checksum(header[:8] + page, previous, big) != stored(header):
            skipped.append(i)
            continue
        kept.append(i)
        if struct.unpack(">I", header[4:8])[0]:
            commits, end = commits + 1, len(kept)
            if commits == missing_commits:
                break
    if not commits:
        return None
    out = bytearray(data[: 32 + committed * size])
    chain = valid_chain
    for i in kept[:end]:
        header, page = frame(i)
        chain = _checksum(header[:8] + page, chain, big)
        out += header[:16] + struct.pack(">II", *chain) + page
    last = kept[end - 1]
    return WalRepair(bytes(out), commits, sum(1 for i in skipped if i < last))
