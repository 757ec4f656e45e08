"""CPU per request of a node's serving side alone, with no sockets: what a
server spends between a Request frame and its Reply frame.

    python benchmarks/responder.py [--rounds N]

Rounds of 100 encoded Request frames (16 B echo) are decoded and handed to
the node's responder; each round waits until all 100 replies are encoded.
The figure is process CPU time per request, so other work on the machine
changes it less than wall time; take the lowest of a few runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pigeon._core import frames
from pigeon.message import Message, make_message
from pigeon.transports.local import LocalServices
from pigeon.transports.zmq.responder import Responder
from pigeon.worker import Server

BATCH = 100


async def cpu_per_request(rounds: int) -> float:
    services = LocalServices()

    async def echo(message: Message) -> bytes:
        return message.body

    services.add("echo", Server("echo", echo)._serve)
    replies: list[bytes] = []
    answered = asyncio.Event()

    def send(_peer: bytes, frame: frames.Frame) -> None:
        replies.append(frames.encode(frame))
        if len(replies) == BATCH:
            answered.set()

    responder = Responder(services, send)
    requests = [
        [
            frames.encode(frames.Request(m.id, "echo", m, 5.0))
            for m in (make_message(b"x" * 16) for _ in range(BATCH))
        ]
        for _ in range(rounds)
    ]
    start = time.process_time()
    for batch in requests:
        for data in batch:
            request = frames.decode(data)
            assert isinstance(request, frames.Request)
            responder.on_request(b"peer", request)
        await answered.wait()
        answered.clear()
        replies.clear()
    return (time.process_time() - start) / (BATCH * rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"{asyncio.run(cpu_per_request(args.rounds)) * 1e6:.1f} µs of CPU per request")


if __name__ == "__main__":
    main()
