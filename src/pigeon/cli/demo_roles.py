"""The six services of the demo: a fountain of words, three processors and
two responders behind one service name, as in the classic ZeroMQ example.

Each role is an async function that reports what it did through ``emit``
(a dict per event), so the same code runs as tasks in one process or as
separate OS processes that print their events as JSON lines.

Run one role as a process: ``python -m pigeon.cli.demo_roles ROLE JSON-ARGS``.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pigeon
from pigeon.message import new_id

Emit = Callable[[dict[str, Any]], None]

WORDS = [w for w in dir(builtins) if w.islower() and not w.startswith("_")]
CASES: dict[str, Callable[[str], str]] = {"upper": str.upper, "lower": str.lower}


def _connect(url: str | None, bind: str | None = None, **options: Any) -> pigeon.Connection:
    # With a broker URL every role connects to it; brokerless, nodes bind.
    return pigeon.connect(url, **options) if url else pigeon.connect(bind=bind, **options)


async def fountain(
    emit: Emit,
    stop: asyncio.Event,
    *,
    rate: float,
    seconds: float | None,
    bind: str | None = None,
    url: str | None = None,
    halt: asyncio.Event | None = None,
    store: str | None = None,
    keys: dict[str, str] | None = None,
) -> None:
    """Send random words at ``rate`` per second until ``seconds`` pass or
    ``halt`` is set; keep hosting the queue until ``stop``. ``keys``: the
    node's ``key`` and ``allow`` (``--secure``)."""
    halt = halt or asyncio.Event()
    options: dict[str, Any] = {"store": store} if store else {}
    options.update(keys or {})
    async with _connect(url, bind, **options) as conn:
        if store:
            emit({"ev": "restored", "count": conn.stats()["restored"]})
        emit({"ev": "ready", "role": "fountain"})
        interval = 1.0 / rate
        started = time.monotonic()
        sent = 0
        while not (halt.is_set() or stop.is_set()):
            if seconds is not None and time.monotonic() - started >= seconds:
                break
            word = random.choice(WORDS)
            message_id = new_id()
            await conn.send("words", word, message_id=message_id)
            emit({"ev": "produced", "id": message_id, "word": word})
            sent += 1
            # Keep the rate on schedule rather than drifting with send times.
            delay = started + sent * interval - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(halt.wait(), delay)
                except TimeoutError:
                    pass
        emit({"ev": "producing_done", "sent": sent})
        await stop.wait()


async def processor(
    emit: Emit,
    stop: asyncio.Event,
    *,
    number: int,
    fountain_url: str | None = None,
    responder_urls: list[str] | None = None,
    url: str | None = None,
    keys: dict[str, str] | None = None,
) -> None:
    """Take each word from the queue, get it processed by ``case``, print it.
    ``keys``: this client's ``key`` and the nodes' ``server_key``."""
    where = url or [fountain_url or "", *(responder_urls or [])]
    options: dict[str, Any] = dict(keys or {})
    async with pigeon.connect(where, **options) as conn:

        async def process(delivery: pigeon.Delivery) -> None:
            word = delivery.message.text
            reply = (await conn.request("case", word, timeout=10.0)).decode()
            emit(
                {
                    "ev": "processed",
                    "processor": number,
                    "id": delivery.message.id,
                    "word": reply["word"],
                    "responder": reply["by"],
                    "redelivered": delivery.message.redelivered,
                }
            )

        await conn.consume(
            "words", process, prefetch=2, retry=pigeon.RetryPolicy(max_attempts=50, max_delay=1.0)
        )
        emit({"ev": "ready", "role": f"processor-{number}"})
        await stop.wait()


async def responder(
    emit: Emit,
    stop: asyncio.Event,
    *,
    case: str,
    bind: str | None = None,
    url: str | None = None,
    keys: dict[str, str] | None = None,
) -> None:
    """Answer ``case`` requests by changing the word's case."""
    change = CASES[case]
    async with _connect(url, bind, **(keys or {})) as conn:
        await conn.serve("case", lambda message: {"word": change(message.text), "by": case})
        emit({"ev": "ready", "role": f"responder-{case}"})
        await stop.wait()


ROLES: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
    "fountain": fountain,
    "processor": processor,
    "responder": responder,
}


def main() -> None:
    """Run one role in this process; events go to stdout as JSON lines.

    SIGINT is ignored (Ctrl-C reaches the whole process group; the demo's
    parent decides when to stop); SIGUSR1 makes the fountain stop producing;
    SIGTERM stops the role cleanly.
    """
    role, kwargs = sys.argv[1], json.loads(sys.argv[2])

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    async def run() -> None:
        stop, halt = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, halt.set)
        if role == "fountain":
            kwargs["halt"] = halt
        await ROLES[role](emit, stop, **kwargs)
        emit({"ev": "exit", "role": role})

    asyncio.run(run())


if __name__ == "__main__":
    main()
