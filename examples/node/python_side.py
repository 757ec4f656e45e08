"""The Python side of the Node.js example: pigeon peers the Node programs talk to.

Connects to a ``pigeon node`` and, as asked:

- serves ``upper`` (uppercases text), ``fail`` (raises: the caller gets
  ``Rejected``) and ``slow`` (sleeps 30 s: the caller times out) behind the
  node, which relays calls to them;
- consumes ``--consume QUEUE`` and counts every message id it runs;
- sends ``--send N`` text messages to ``--send-queue QUEUE``, confirmed.

It writes its state as JSON to ``--status PATH`` (atomically, several times
a second) until SIGTERM::

    python python_side.py tcp://127.0.0.1:5555 --consume from-node \\
        --send 100 --send-queue to-node --status side.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import pigeon
from pigeon.message import new_id


async def main(args: argparse.Namespace) -> None:
    state: dict[str, object] = {
        "ready": False,
        "received": [],
        "sent": [],
        "bodies": [],
        "services": [],
    }
    received: list[str] = state["received"]  # type: ignore[assignment]
    bodies: list[str] = state["bodies"]  # type: ignore[assignment]

    def write() -> None:
        tmp = args.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, args.status)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with pigeon.connect(args.url, connect_grace=60.0) as conn:
        await conn.serve("upper", lambda message: message.text.upper())

        def fail(message: pigeon.Message) -> str:
            raise ValueError(f"fail was asked to fail on {message.text!r}")

        async def slow(message: pigeon.Message) -> str:
            await asyncio.sleep(30)
            return "too late"

        await conn.serve("fail", fail)
        await conn.serve("slow", slow)

        if args.consume:

            async def handle(delivery: pigeon.Delivery) -> None:
                received.append(delivery.message.id)
                bodies.append(delivery.message.text)

            await conn.consume(args.consume, handle, prefetch=64)

        if args.send:
            messages = [f"from python {i}" for i in range(args.send)]
            ids = []
            for text in messages:
                # message_id lets the test know each id before it is acked.
                ids.append(new_id())
                await conn.send(args.send_queue, text, message_id=ids[-1])
            state["sent"] = ids

        # Ready once the node relays our services: ask it what it relays.
        while not stop.is_set():
            info = (await conn.request("pigeon.info", b"", timeout=10.0)).decode()
            relayed = set((info.get("relay") or {}).get("services", []))
            state["services"] = sorted(relayed)
            if {"upper", "fail", "slow"} <= relayed:
                break
            await asyncio.sleep(0.1)
        state["ready"] = True
        while not stop.is_set():
            write()
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass
        write()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--consume", default="")
    parser.add_argument("--send", type=int, default=0)
    parser.add_argument("--send-queue", default="to-node")
    parser.add_argument("--status", required=True)
    asyncio.run(main(parser.parse_args()))
