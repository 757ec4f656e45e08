"""Redis Streams peers through redis-py: one stream, one consumer group.

The producer XADDs one entry at a time (a round trip each, the shape of an
awaited send) or pipelined, PIPELINE entries to a round trip. Three worker
processes in one consumer group each XREADGROUP up to READ_COUNT entries,
blocking while the stream is empty, and XACK the batch with one call. Each
run gets its own stream, which the parent creates with the group and deletes
afterwards, even if a child died; nothing else on the server is touched.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pigeon.bench.harness import GRACE_S, Ctl, Tally, reporting
from pigeon.bench.shapes import run_queue

GROUP = "workers"
FIELD = b"b"
READ_COUNT = 100
PIPELINE = 1000
# A worker's XREADGROUP blocks at most this long, so that it publishes its
# tally and sees the parent's stop even while the stream is empty.
BLOCK_MS = 50
# The settings that say whether, and how often, the server writes to disk.
PERSISTENCE = ("appendonly", "appendfsync", "save")


def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=GRACE_S)


@contextlib.contextmanager
def _own_stream(opts: Any, **extra: Any) -> Iterator[dict[str, Any]]:
    """A config naming a new stream with its consumer group; the stream is
    deleted afterwards."""
    cfg = {"url": opts.redis_url, "stream": f"pigeonbench:{uuid.uuid4().hex[:12]}", **extra}
    admin = _client(cfg["url"])
    try:
        admin.xgroup_create(cfg["stream"], GROUP, id="0", mkstream=True)
        yield cfg
    finally:
        admin.delete(cfg["stream"])
        admin.close()


def persistence(url: str) -> str:
    """What the server is configured to persist, as ``CONFIG GET`` tells it
    (read only: the server's configuration is not changed)."""
    import redis

    client = _client(url)
    try:
        settings = {
            name: _text(value) for name in PERSISTENCE for value in client.config_get(name).values()
        }
    except redis.ResponseError as exc:  # CONFIG may be renamed or forbidden
        return f"Redis persistence unknown (CONFIG GET refused: {exc})"
    finally:
        client.close()
    return "Redis " + ", ".join(f"{name} {settings.get(name, '?')!r}" for name in PERSISTENCE)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------- queue


def queue_producer(ctl: Ctl) -> None:
    """XADD for ``seconds``, one at a time or pipelined by PIPELINE."""
    with reporting(ctl):
        client = _client(ctl.cfg["url"])
        client.ping()
        ctl.bound.set()
        ctl.wait_workers()
        add = _pipelined if ctl.cfg["pipelined"] else _one_at_a_time
        t0 = time.perf_counter()
        ctl.t0.value = t0
        ctl.sent.value = add(
            client, ctl.cfg["stream"], b"x" * ctl.cfg["size"], t0 + ctl.cfg["seconds"]
        )
        ctl.done.set()
        ctl.stop.wait(10 * GRACE_S)
        client.close()


def _one_at_a_time(client: Any, stream: str, body: bytes, end: float) -> int:
    xadd, fields = client.xadd, {FIELD: body}
    added = 0
    while time.perf_counter() < end:
        for _ in range(100):  # check the clock only every 100 round trips
            xadd(stream, fields)
        added += 100
    return added


def _pipelined(client: Any, stream: str, body: bytes, end: float) -> int:
    pipe, fields = client.pipeline(transaction=False), {FIELD: body}
    added = 0
    while time.perf_counter() < end:
        for _ in range(PIPELINE):
            pipe.xadd(stream, fields)
        pipe.execute()
        added += PIPELINE
    return added


def queue_worker(ctl: Ctl, i: int) -> None:
    """One consumer of the group: XREADGROUP a batch, XACK it, count it."""
    with reporting(ctl):
        client = _client(ctl.cfg["url"])
        client.ping()
        ctl.worker_ready()
        stream, consumer = ctl.cfg["stream"], f"worker-{i}"
        clock = time.perf_counter
        tally = Tally()
        while not ctl.stop.is_set():
            got = client.xreadgroup(
                GROUP, consumer, {stream: ">"}, count=READ_COUNT, block=BLOCK_MS
            )
            if got:
                ((_, entries),) = got
                client.xack(stream, GROUP, *(entry_id for entry_id, _ in entries))
                tally.n += len(entries)
                tally.last = clock()
            tally.publish(ctl, i)
        client.close()


def _queue(opts: Any, size: int, pipelined: bool) -> dict[str, Any]:
    with _own_stream(opts, size=size, pipelined=pipelined) as cfg:
        row = run_queue(queue_producer, queue_worker, cfg, opts.seconds)
    return _noted(row, _parser())


def _parser() -> str:
    """Which reply parser redis-py used: with its pure-Python one instead of
    hiredis, its C one, the pipelined rows ran at less than half the rate here."""
    from redis.utils import HIREDIS_AVAILABLE

    return "hiredis parser" if HIREDIS_AVAILABLE else "pure-Python parser (no hiredis)"


def _noted(row: dict[str, Any], note: str) -> dict[str, Any]:
    """``row`` with ``note`` after any note it already has (say, lost messages)."""
    return {**row, "note": "; ".join(n for n in (row.get("note"), note) if n)}


def queue_one_at_a_time(opts: Any, size: int) -> dict[str, Any]:
    """XADD one entry per round trip; 3 group consumers with XACK per batch."""
    return _queue(opts, size, pipelined=False)


def queue_pipelined(opts: Any, size: int) -> dict[str, Any]:
    """XADD pipelined by PIPELINE; 3 group consumers with XACK per batch."""
    return _queue(opts, size, pipelined=True)


def queue_durable_one_at_a_time(opts: Any, size: int) -> dict[str, Any]:
    """As :func:`queue_one_at_a_time`; the note says what the server persists."""
    return _noted(queue_one_at_a_time(opts, size), persistence(opts.redis_url))


def queue_durable_pipelined(opts: Any, size: int) -> dict[str, Any]:
    """As :func:`queue_pipelined`; the note says what the server persists."""
    return _noted(queue_pipelined(opts, size), persistence(opts.redis_url))
