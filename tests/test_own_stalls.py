"""A node whose own loop stalls does not take its live peers for dead
(``_core.liveness`` Rule 4), but still finds a peer that went silent.

The stall is real: the node is a ``pigeon node`` process, stopped with
SIGSTOP (as a paused or CPU-starved process is) while its peers go on
beating into its socket."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import pigeon
from pigeon.admin import open_admin

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")

WAIT = 30.0
HEARTBEAT = 0.2  # the node's: a silent peer is dead after 0.6 s
STALL = 3.0  # seconds the node is stopped: five graces

# A worker in its own process, so it can be stopped too: it holds what it
# gets and says so.
WORKER = """
import asyncio, sys, pigeon
async def main():
    async with pigeon.connect(sys.argv[1], heartbeat=0.2) as conn:
        async def hold(delivery):
            print("held", flush=True)
            await asyncio.Event().wait()
        await conn.consume("stall", hold, prefetch=1)
        print("consuming", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


class Lines:
    """The stdout lines of a process, read without blocking."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self._fd = proc, proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self.lines: list[str] = []
        self._buffer = b""

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line so far or to come that matches ``pattern``."""
        deadline = time.monotonic() + WAIT
        while True:
            for line in self.lines:
                if found := re.search(pattern, line):
                    return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(
                    f"no line matching {pattern!r}: {self.lines!r} (exit {self.proc.poll()})"
                )
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                chunk = b""
            *done, self._buffer = (self._buffer + chunk).split(b"\n")
            self.lines += [line.decode() for line in done]
            if not chunk:
                time.sleep(0.05)


async def until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def test_a_stalled_node_keeps_its_live_peers_and_reaps_a_silent_one() -> None:
    hub = subprocess.Popen(
        [sys.executable, "-m", "pigeon.cli.main", "node", "--bind", "tcp://127.0.0.1:0"]
        + ["--heartbeat", str(HEARTBEAT)],
        stdout=subprocess.PIPE,
    )
    silent: subprocess.Popen[bytes] | None = None
    try:
        url = Lines(hub).wait_for(r"serving (tcp://\S+?);").group(1)
        silent = subprocess.Popen([sys.executable, "-c", WORKER, url], stdout=subprocess.PIPE)
        said = Lines(silent)
        said.wait_for("consuming")

        async def scenario() -> None:
            assert silent is not None
            # The live worker bears a long silence of the node (its own grace
            # is 30 beats): only the node's view of it is under test.
            async with pigeon.connect(url, heartbeat=HEARTBEAT, heartbeat_misses=150) as live:
                await live.send("stall", "first")
                said.wait_for("held")
                held: list[pigeon.Delivery] = []

                async def hold(delivery: pigeon.Delivery) -> None:
                    held.append(delivery)
                    await asyncio.Event().wait()

                await live.consume("stall", hold, concurrency=2)
                await live.send("stall", "second")
                await until(lambda: _true(len(held) == 1), "the live worker's delivery")

                os.kill(silent.pid, signal.SIGSTOP)  # silent from here on
                os.kill(hub.pid, signal.SIGSTOP)
                await asyncio.sleep(STALL)  # the live worker beats on meanwhile
                os.kill(hub.pid, signal.SIGCONT)

                # The silent worker is found dead (its grace starts after the
                # stall) and what it held comes to the live one.
                await until(lambda: _true(len(held) == 2), "the silent worker's delivery")
                assert held[1].message.body == b"first" and held[1].message.redelivered
                admin = await open_admin(url)
                try:
                    info = await admin.info()
                finally:
                    await admin.close()
                # The live worker was never taken for dead: one peer lost.
                assert info["peers_lost"] == 1, info
                assert info["loop_stalls"] >= 1 and info["stall_seconds_excused"] >= 1.0, info
                assert held[0].message.body == b"second" and not held[0].message.redelivered

        asyncio.run(scenario())
    finally:
        for proc in (silent, hub):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                assert proc.stdout is not None
                proc.stdout.close()


async def _true(value: bool) -> bool:
    return value
