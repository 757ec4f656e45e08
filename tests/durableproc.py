"""Child processes for the durable-queue fault tests: a producer and a worker
that record what they do in their own history file. The host is the real
``pigeon node --store`` command.

Run as ``python tests/durableproc.py ROLE URL HISTORY NAME [options]``. Each
role prints ``ready`` on stdout once connected and ``done`` when it finished
its work; SIGTERM stops it cleanly, SIGKILL is what the tests mostly use.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import pigeon
from pigeon.errors import Backpressure, MessageTooLarge
from pigeon.message import new_id
from pigeon.testing.history import HistoryWriter

QUEUE = "jobs"
HEARTBEAT = 0.2
# Far above what the faults of a run can add up to: a message dead-lettered
# for too many attempts would look lost, and these tests are about crashes.
MAX_ATTEMPTS = 1000


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stop_on_sigterm() -> asyncio.Event:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


async def producer(args: argparse.Namespace) -> None:
    """Send ``count`` numbered messages at about ``rate`` per second with up
    to ``window`` unconfirmed at once, so a kill catches several in flight."""
    stop = stop_on_sigterm()
    history = HistoryWriter(args.history, process=args.name)
    in_flight: set[asyncio.Future[None]] = set()

    def record_outcome(message_id: str, future: asyncio.Future[None]) -> None:
        in_flight.discard(future)
        if future.cancelled():
            history.send_info(QUEUE, message_id, "cancelled")
        elif isinstance(future.exception(), (Backpressure, MessageTooLarge)):
            history.send_fail(QUEUE, message_id, future.exception())  # type: ignore[arg-type]
        elif future.exception() is not None:
            # e.g. closed before the host confirmed: it may still have been stored.
            history.send_info(QUEUE, message_id, future.exception())  # type: ignore[arg-type]
        else:
            history.send_ok(QUEUE, message_id)

    async with pigeon.connect(args.url, heartbeat=HEARTBEAT) as conn:
        say("ready")
        loop = asyncio.get_running_loop()
        started = loop.time()
        for seq in range(args.first_seq, args.first_seq + args.count):
            if stop.is_set():
                break
            # Pace by the clock, not by confirms: while the host is down the
            # window fills and the producer waits, then catches up.
            delay = started + (seq - args.first_seq) / args.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(in_flight) >= args.window:
                await asyncio.wait(set(in_flight), return_when=asyncio.FIRST_COMPLETED)
            message_id = new_id()
            body = f"{args.name}:{seq}".encode()
            history.send_invoke(QUEUE, message_id, producer=args.name, seq=seq, body=body)
            try:
                future = conn.send_nowait(QUEUE, body, message_id=message_id)
            except (Backpressure, MessageTooLarge) as exc:
                history.send_fail(QUEUE, message_id, exc)
                continue
            in_flight.add(future)
            future.add_done_callback(lambda f, i=message_id: record_outcome(i, f))
        if in_flight:
            # Bounded: the test stops waiting for a producer long before this.
            await asyncio.wait(set(in_flight), timeout=30)
        say("done")
        await stop.wait()
    history.close()


async def worker(args: argparse.Namespace) -> None:
    """Consume the queue, recording every delivery. Acks are not recorded:
    the library sends them without confirmation, so a host killed right
    after may never have seen one (the message then comes back marked)."""
    stop = stop_on_sigterm()
    history = HistoryWriter(args.history, process=args.name)

    async def handle(delivery: pigeon.Delivery) -> None:
        message = delivery.message
        history.deliver(
            QUEUE,
            message.id,
            redelivered=message.redelivered,
            attempt=message.attempt,
            body=message.body,
            consumer=args.name,
        )
        # A little work per message, so a kill finds several leased here.
        await asyncio.sleep(args.work)

    async with pigeon.connect(args.url, heartbeat=HEARTBEAT) as conn:
        await conn.consume(
            QUEUE,
            handle,
            prefetch=args.prefetch,
            retry=pigeon.RetryPolicy(max_attempts=MAX_ATTEMPTS),
        )
        say("ready")
        await stop.wait()
    history.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("producer", "worker"))
    parser.add_argument("url")
    parser.add_argument("history")
    parser.add_argument("name")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--first-seq", type=int, default=0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=32)
    parser.add_argument("--work", type=float, default=0.004)
    args = parser.parse_args()
    asyncio.run(producer(args) if args.role == "producer" else worker(args))


if __name__ == "__main__":
    main()
