"""Liveness between real nodes: a peer that beats slower than its host is
kept (Hello says its interval), and a peer paused past its heartbeat misses
is told it is a stranger when it resumes, and consumes again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

import pigeon

pytestmark = pytest.mark.timeout(60)

WORKER = """
import asyncio, sys
import pigeon

async def main() -> None:
    async with pigeon.connect(sys.argv[1], heartbeat=0.2) as worker:
        def handle(delivery: pigeon.Delivery) -> None:
            print(delivery.message.text, flush=True)
        await worker.consume("jobs", handle)
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def test_a_peer_beating_slower_than_its_host_is_not_declared_dead() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", heartbeat=0.3) as node:
            url = node.stats()["bound"][0]
            got: list[str] = []
            async with pigeon.connect(url, heartbeat=1.0) as worker:
                await worker.consume("jobs", lambda d: got.append(d.message.text))
                await asyncio.sleep(2.5)  # past 3 x 0.3 s, well within 3 x 1 s
                assert node.stats()["peers_lost"] == 0
                await node.send("jobs", "still here")
                await _until(lambda: got == ["still here"], 5.0, "no delivery")

    asyncio.run(asyncio.wait_for(scenario(), 50))


def test_a_paused_worker_consumes_again_when_it_resumes() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", heartbeat=0.2) as node:
            url = node.stats()["bound"][0]
            # (A quick non-blocking start; its output is read without blocking.)
            child = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-c", WORKER, url],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            os.set_blocking(child.stdout.fileno(), False)
            lines: list[str] = []

            def said(text: str) -> bool:
                lines.extend(line.strip() for line in child.stdout.readlines())  # type: ignore[union-attr]
                return text in lines

            try:
                await _until(lambda: said("ready"), 20.0, "the worker did not start")
                await node.send("jobs", "one")
                await _until(lambda: said("one"), 5.0, "no first delivery")
                child.send_signal(signal.SIGSTOP)
                # The host gives it up after 3 missed beats (0.6 s).
                await _until(lambda: node.stats()["peers_lost"] >= 1, 5.0, "never reaped")
                await asyncio.sleep(0.3)
                child.send_signal(signal.SIGCONT)
                await node.send("jobs", "two")
                await _until(lambda: said("two"), 10.0, "the resumed worker got nothing")
            finally:
                child.send_signal(signal.SIGCONT)
                child.kill()
                child.wait()
                child.stdout.close()

    asyncio.run(asyncio.wait_for(scenario(), 50))
