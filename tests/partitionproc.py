"""Child processes for the partition tests (tests/test_partitions.py): a
server whose heartbeat tolerance is set, and a worker that settles only when
told. Run as ``python tests/partitionproc.py ROLE URL [options]``; events go
to stdout as JSON lines (as faultproc.py's), errors to stderr.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import traceback
from typing import Any

from faultproc import HEARTBEAT, emit

import pigeon

# This worker acks late on purpose, to show what its host does with such
# acks. Where consume() can cut a lost host's deliveries short instead
# (abandon_on_host_loss), that is turned off for it.
ACK_LATE: dict[str, Any] = (
    {"abandon_on_host_loss": False}
    if "abandon_on_host_loss" in inspect.signature(pigeon.Connection.consume).parameters
    else {}
)


def die_with(task: asyncio.Task[None]) -> None:
    """End the process at once if a background task failed: the test then
    sees why on stderr instead of waiting for events that never come."""
    if not task.cancelled() and task.exception() is not None:
        traceback.print_exception(task.exception())
        sys.stderr.flush()
        os._exit(1)


async def server(url: str, misses: str) -> None:
    """Binds ``url`` and serves ``svc`` (answers ``far:TEXT`` at once);
    ``misses`` is its ``heartbeat_misses``, the heartbeats a peer may miss
    before this node gives it up."""
    async with pigeon.connect(bind=url, heartbeat=HEARTBEAT, heartbeat_misses=int(misses)) as conn:
        await conn.serve("svc", lambda message: f"far:{message.text}")
        emit(ev="ready", url=conn.stats()["bound"][0])
        await asyncio.Event().wait()


async def late_acking_worker(url: str, queue: str, prefetch: str, lease_ttl: str) -> None:
    """Takes up to ``prefetch`` deliveries at once and holds them until a line
    comes on stdin; then, once its link to the host is up, acks every one
    (late: the host may have given them to someone else meanwhile) and every
    later one at once. Says ``up`` and ``down`` as its link comes and goes
    (sampled every 10 ms), and ``ready`` once it is up."""
    async with pigeon.connect(url, heartbeat=HEARTBEAT) as conn:
        release = asyncio.Event()
        linked = asyncio.Event()  # set while the link is up

        def link_up() -> bool:
            return all(link["up"] for link in conn.stats()["links"].values())

        async def hold(delivery: pigeon.Delivery) -> None:
            message = delivery.message
            emit(ev="got", id=message.id, redelivered=message.redelivered, attempt=message.attempt)
            await release.wait()
            emit(ev="acked", id=message.id)  # returning acks

        async def watch_link() -> None:
            while True:
                if link_up() != linked.is_set():
                    if linked.is_set():
                        linked.clear()
                        emit(ev="down")
                    else:
                        linked.set()
                        emit(ev="up")
                await asyncio.sleep(0.01)

        await conn.consume(
            queue,
            hold,
            prefetch=int(prefetch),
            concurrency=int(prefetch),
            lease_ttl=float(lease_ttl),
            **ACK_LATE,
        )
        watcher = asyncio.ensure_future(watch_link())
        watcher.add_done_callback(die_with)
        # consume() does not wait for a link that is not up yet: say ready
        # only once it is (and "up" has been said), so that the link's
        # going down later is seen, however short its time up.
        await linked.wait()
        emit(ev="ready")
        await asyncio.to_thread(sys.stdin.readline)
        await linked.wait()
        release.set()
        emit(ev="released")
        await watcher


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    roles = {"server": server, "late_acking_worker": late_acking_worker}
    asyncio.run(roles[role](*args))
