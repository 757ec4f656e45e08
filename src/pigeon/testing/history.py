"""Record what a fault test's processes did, then check the system kept its promises.

Each producer, consumer, client and server process of a fault test appends
what it did to its own JSONL file with a :class:`HistoryWriter`. After the run,
:func:`load_history` merges the files by monotonic time and :func:`check`
derives the invariants: nothing acknowledged was lost, nothing was delivered
that was never sent, duplicates carry the redelivered flag, bodies arrive
intact, per-producer order holds, no RPC handler ran twice on one server, and
every reply answers its own request.

Run ``python -m pigeon.testing.history FILE...`` to print the summary as JSON;
the exit status is 1 when the history is not valid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from ..errors import ClosedError, ConfigurationError, DecodeError

__all__ = ["CheckResult", "Event", "HistoryWriter", "check", "load_history", "main"]

StrPath = str | os.PathLike[str]


class Event(msgspec.Struct, omit_defaults=True):
    """One line of a history; the user doc describes every field.

    ``t`` is ``time.monotonic_ns()`` and the merge key; ``wall`` is for humans.
    ``type`` is invoke, ok, fail (definitely did not happen) or info (unknown);
    ``f`` is send, deliver, ack, request, execute or nemesis. ``id`` is the
    message id, or the request id of RPC events; ``sha`` is a body's sha256.
    Fields an event does not use are None and left out of its line.
    """

    t: int
    wall: float
    proc: str
    type: str
    f: str
    queue: str | None = None
    service: str | None = None
    id: str | None = None
    producer: str | None = None
    seq: int | None = None
    sha: str | None = None
    redelivered: bool | None = None
    attempt: int | None = None
    consumer: str | None = None
    server: str | None = None
    reply_to: str | None = None
    error: str | None = None
    what: str | None = None
    target: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _error_text(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return error


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a writer killed mid-write.

    Without this, a restarted process appending to the same file would glue
    its first event onto the fragment and make a line in the middle unreadable.
    """
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


class HistoryWriter:
    """Append one process's events to a JSONL history file.

    Every event is written with a single unbuffered ``write`` of one whole
    line, so a process killed with SIGKILL leaves at most its last line
    partial. Use one file per writer; the writer is thread-safe.

    Args:
        path: the file to append to (created if missing).
        process: the name recorded as ``proc`` on every event.

    Raises:
        ConfigurationError: ``process`` is not a non-empty string.
    """

    def __init__(self, path: StrPath, *, process: str) -> None:
        if not isinstance(process, str) or not process:
            raise ConfigurationError(f"process must be a non-empty name, not {process!r}")
        self.path = Path(path)
        self.process = process
        self._lock = threading.Lock()
        _drop_torn_tail(self.path)
        self._file: IO[bytes] | None = open(self.path, "ab", buffering=0)

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Sync the file to disk and close it; closing twice is harmless."""
        with self._lock:
            if self._file is None:
                return
            try:
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
                self._file = None

    def _emit(self, type: str, f: str, **fields: Any) -> None:
        with self._lock:
            if self._file is None:
                raise ClosedError(
                    f"history writer for {self.path} is closed; open a new HistoryWriter "
                    "to append to it"
                )
            # The time is taken under the lock so file order equals time order.
            event = Event(
                t=time.monotonic_ns(), wall=time.time(), proc=self.process, type=type, f=f, **fields
            )
            view = memoryview(_encoder.encode(event) + b"\n")
            while view:
                view = view[self._file.write(view) :]

    def send_invoke(self, queue: str, id: str, *, producer: str, seq: int, body: bytes) -> None:
        """Record that the producer is about to send message ``id`` (call before sending)."""
        self._emit("invoke", "send", queue=queue, id=id, producer=producer, seq=seq, sha=_sha(body))

    def send_ok(self, queue: str, id: str) -> None:
        """Record that the library confirmed the message was accepted."""
        self._emit("ok", "send", queue=queue, id=id)

    def send_fail(self, queue: str, id: str, error: BaseException | str) -> None:
        """Record that the message was definitely not accepted."""
        self._emit("fail", "send", queue=queue, id=id, error=_error_text(error))

    def send_info(self, queue: str, id: str, error: BaseException | str) -> None:
        """Record that the send's outcome is unknown (timeout, connection lost)."""
        self._emit("info", "send", queue=queue, id=id, error=_error_text(error))

    def deliver(
        self, queue: str, id: str, *, redelivered: bool, attempt: int, body: bytes, consumer: str
    ) -> None:
        """Record one delivery of a message to application code."""
        self._emit(
            "ok",
            "deliver",
            queue=queue,
            id=id,
            redelivered=redelivered,
            attempt=attempt,
            sha=_sha(body),
            consumer=consumer,
        )

    def ack_ok(self, queue: str, id: str, *, consumer: str) -> None:
        """Record that the library confirmed the ack (call after it returns)."""
        self._emit("ok", "ack", queue=queue, id=id, consumer=consumer)

    def request_invoke(self, service: str, request_id: str) -> None:
        """Record that a client is about to send request ``request_id``."""
        self._emit("invoke", "request", service=service, id=request_id)

    def request_ok(self, service: str, request_id: str, *, reply_to: str) -> None:
        """Record a reply; ``reply_to`` is the request id the reply says it answers."""
        self._emit("ok", "request", service=service, id=request_id, reply_to=reply_to)

    def request_fail(self, service: str, request_id: str, error: BaseException | str) -> None:
        """Record that a request ended without a reply (timeout, error)."""
        self._emit("fail", "request", service=service, id=request_id, error=_error_text(error))

    def execute(self, service: str, request_id: str, *, server: str) -> None:
        """Record one run of a handler for ``request_id`` on ``server``."""
        self._emit("ok", "execute", service=service, id=request_id, server=server)

    def nemesis(self, what: str, target: str) -> None:
        """Record a fault starting or stopping, so failures can be attributed."""
        self._emit("info", "nemesis", what=what, target=target)


def load_history(paths: StrPath | Iterable[StrPath]) -> list[Event]:
    """Read and merge history files, sorted by monotonic time.

    A partial last line in a file (its writer was killed mid-line) is
    skipped; an unreadable line anywhere else raises.

    Args:
        paths: one path or several.

    Returns:
        All events, sorted by ``t`` (ties keep file order).

    Raises:
        DecodeError: a line other than a file's partial last line is not a valid
            event (the message names the file and line).
        OSError: a file cannot be read.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    events: list[Event] = []
    for path in paths:
        lines = Path(path).read_bytes().split(b"\n")
        # After split, the last element is b"" for a complete file, else the torn line.
        torn = len(lines) - 1
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                events.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                if n == torn:
                    continue
                raise DecodeError(f"{path}:{n + 1}: bad history line: {exc}") from exc
    events.sort(key=lambda e: e.t)
    return events


_PROBLEMS = (
    "lost",
    "unexpected",
    "false_fail",
    "corrupt",
    "unmarked_duplicates",
    "redelivered_after_ack",
    "order_inversions",
    "rpc_double_execution",
    "rpc_mismatched",
)
_NOTES = ("recovered", "rpc_multi_server")
_PARTS = ("prefix", "middle", "postfix")


@dataclass(repr=False)
class CheckResult:
    """What :func:`check` found. Id sets hold message or request ids.

    ``valid`` is True only when lost, unexpected, false_fail, corrupt,
    unmarked_duplicates, redelivered_after_ack, order_inversions,
    rpc_double_execution and rpc_mismatched are all empty; ``recovered``,
    ``marked_duplicates`` and ``rpc_multi_server`` are informational.
    ``counts`` holds totals (events, attempted, acknowledged, failed,
    indeterminate, delivered, deliveries, requests, executions, nemesis).
    ``lost_breakdown`` maps producer -> {"prefix"|"middle"|"postfix": lost ids by seq},
    relative to the lowest and highest seq delivered from that producer (a
    producer with nothing delivered has all its losses in "prefix"). Middle
    loss is the serious kind: later messages got through but these did not.
    """

    lost: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)
    false_fail: set[str] = field(default_factory=set)
    recovered: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    unmarked_duplicates: set[str] = field(default_factory=set)
    marked_duplicates: int = 0
    redelivered_after_ack: set[str] = field(default_factory=set)
    order_inversions: set[str] = field(default_factory=set)
    rpc_double_execution: set[str] = field(default_factory=set)
    rpc_multi_server: set[str] = field(default_factory=set)
    rpc_mismatched: set[str] = field(default_factory=set)
    lost_breakdown: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        """True when no invariant was broken."""
        return not any(getattr(self, name) for name in _PROBLEMS)

    def summary(self) -> dict[str, object]:
        """Return the counts as a JSON-serialisable dict."""
        out: dict[str, object] = {"valid": self.valid, **self.counts}
        for name in _PROBLEMS + _NOTES:
            out[name] = len(getattr(self, name))
        out["marked_duplicates"] = self.marked_duplicates
        out["lost_breakdown"] = {
            part: sum(len(parts[part]) for parts in self.lost_breakdown.values()) for part in _PARTS
        }
        return out

    def __repr__(self) -> str:
        return f"CheckResult({self.summary()})"

    def __str__(self) -> str:
        c = self.counts
        lines = [
            f"history {'valid' if self.valid else 'INVALID'}: {c.get('events', 0)} events, "
            f"{c.get('attempted', 0)} sent ({c.get('acknowledged', 0)} ok, "
            f"{c.get('failed', 0)} failed, {c.get('indeterminate', 0)} indeterminate), "
            f"{c.get('delivered', 0)} delivered in {c.get('deliveries', 0)} deliveries, "
            f"{self.marked_duplicates} marked duplicates, {c.get('requests', 0)} requests"
        ]
        for name in _PROBLEMS + _NOTES:
            ids = sorted(getattr(self, name))
            if ids:
                more = f", ... {len(ids) - 5} more" if len(ids) > 5 else ""
                note = " (informational)" if name in _NOTES else ""
                lines.append(f"  {name}{note}: {len(ids)} ({', '.join(ids[:5])}{more})")
        if self.lost:
            parts = {
                part: sum(len(p[part]) for p in self.lost_breakdown.values()) for part in _PARTS
            }
            lines.append("  lost by position: " + ", ".join(f"{p} {parts[p]}" for p in _PARTS))
        return "\n".join(lines)


def check(events: Iterable[Event]) -> CheckResult:
    """Derive the invariants from a merged history.

    A message counts as definitely failed only when every send of its id
    ended in ``fail``: a retry with the same id may have landed, and a send
    with an ``info`` outcome or none recorded is indeterminate.

    Args:
        events: events from :func:`load_history` (re-sorted by ``t`` here).

    Returns:
        The :class:`CheckResult`.
    """
    events = sorted(events, key=lambda e: e.t)
    invokes: Counter[str] = Counter()
    fails: Counter[str] = Counter()
    ok: set[str] = set()
    info: set[str] = set()
    sent: dict[str, Event] = {}
    shas: dict[str, set[str | None]] = defaultdict(set)
    deliveries: dict[str, list[Event]] = defaultdict(list)
    first_ack: dict[str, int] = {}
    runs: dict[str, Counter[str | None]] = defaultdict(Counter)
    requests: set[str] = set()
    r = CheckResult()
    for e in events:
        if e.id is None:
            continue
        if e.f == "send":
            if e.type == "invoke":
                invokes[e.id] += 1
                sent.setdefault(e.id, e)
                shas[e.id].add(e.sha)
            elif e.type == "ok":
                ok.add(e.id)
            elif e.type == "fail":
                fails[e.id] += 1
            elif e.type == "info":
                info.add(e.id)
        elif e.f == "deliver":
            deliveries[e.id].append(e)
        elif e.f == "ack" and e.type == "ok":
            first_ack.setdefault(e.id, e.t)
        elif e.f == "execute":
            runs[e.id][e.server] += 1
        elif e.f == "request":
            requests.add(e.id)
            if e.type == "ok" and e.reply_to != e.id:
                r.rpc_mismatched.add(e.id)

    attempted = set(invokes)
    failed = {i for i in attempted - ok - info if fails[i] >= invokes[i]}
    indeterminate = attempted - ok - failed
    delivered = set(deliveries)
    r.lost = ok - delivered
    r.unexpected = delivered - attempted
    r.false_fail = delivered & failed
    r.recovered = delivered & indeterminate
    for i, ds in deliveries.items():
        if i in shas and any(d.sha not in shas[i] for d in ds):
            r.corrupt.add(i)
        for d in ds[1:]:
            if d.redelivered:
                r.marked_duplicates += 1
            else:
                r.unmarked_duplicates.add(i)
        if i in first_ack and ds[-1].t > first_ack[i]:
            r.redelivered_after_ack.add(i)
    r.order_inversions = _inversions(events, sent)
    r.rpc_double_execution = {i for i, c in runs.items() if max(c.values()) > 1}
    r.rpc_multi_server = {i for i, c in runs.items() if len(c) > 1}
    r.lost_breakdown = _breakdown(r.lost, delivered, sent)
    r.counts = {
        "events": len(events),
        "attempted": len(attempted),
        "acknowledged": len(ok),
        "failed": len(failed),
        "indeterminate": len(indeterminate),
        "delivered": len(delivered),
        "deliveries": sum(len(ds) for ds in deliveries.values()),
        "requests": len(requests),
        "executions": sum(c.total() for c in runs.values()),
        "nemesis": sum(1 for e in events if e.f == "nemesis"),
    }
    return r


def _inversions(events: list[Event], sent: dict[str, Event]) -> set[str]:
    """Ids delivered after a higher seq of the same producer, queue and consumer.

    Redeliveries are skipped: a message coming back after a failure is
    expected to overtake nothing and to be overtaken by everything.
    """
    highest: dict[tuple[str | None, str | None, str | None], int] = {}
    out: set[str] = set()
    for e in events:
        if e.f != "deliver" or e.redelivered or e.id not in sent:
            continue
        s = sent[e.id]
        if s.seq is None:
            continue
        key = (e.queue, s.producer, e.consumer)
        if s.seq < highest.get(key, s.seq):
            out.add(e.id)
        highest[key] = max(highest.get(key, s.seq), s.seq)
    return out


def _breakdown(
    lost: set[str], delivered: set[str], sent: dict[str, Event]
) -> dict[str, dict[str, list[str]]]:
    """Split lost ids per producer by where their seq falls among delivered seqs."""
    bounds: dict[str | None, tuple[int, int]] = {}
    for i in delivered:
        s = sent.get(i)
        if s is not None and s.seq is not None:
            lo, hi = bounds.get(s.producer, (s.seq, s.seq))
            bounds[s.producer] = (min(lo, s.seq), max(hi, s.seq))
    out: dict[str, dict[str, list[str]]] = {}
    # Ids that were acknowledged but never invoked have no seq; they sort first as prefix.
    for i in sorted(lost, key=lambda i: (sent[i].seq or 0) if i in sent else -1):
        s = sent.get(i)
        producer = s.producer if s is not None and s.producer is not None else "?"
        seq = s.seq if s is not None else None
        bound = bounds.get(producer)
        if seq is None or bound is None or seq < bound[0]:
            part = "prefix"
        elif seq > bound[1]:
            part = "postfix"
        else:
            part = "middle"
        out.setdefault(producer, {p: [] for p in _PARTS})[part].append(i)
    return out


def main(argv: list[str] | None = None) -> int:
    """Check history files; print the summary as JSON; return 1 when invalid."""
    parser = argparse.ArgumentParser(
        prog="python -m pigeon.testing.history", description="Check fault-test histories."
    )
    parser.add_argument("files", nargs="+", help="JSONL history files, one per process")
    args = parser.parse_args(argv)
    try:
        result = check(load_history(args.files))
    except (OSError, DecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary(), indent=2))
    if not result.valid:
        print(result, file=sys.stderr)
    return 0 if result.valid else 1


if __name__ == "__main__":
    sys.exit(main())
