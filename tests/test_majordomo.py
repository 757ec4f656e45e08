"""Servers behind a node (the zguide's Majordomo): servers that only connect
to a node are called through it, with load balancing, failover, deadlines
and drains as for servers called directly. Real nodes on tcp loopback; the
failover test kills a real server process."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from brokers import ANY_PORT

import pigeon
from pigeon._core import frames
from pigeon.message import Message
from pigeon.security.keys import new_keys
from pigeon.testing.conformance import wait_until

WAIT = 30.0  # bound for what takes well under a second on a quiet machine

# A server process that connects to a node (no port of its own): it says
# "execute <id>" when a call starts, and its handler for "stuck" never ends.
SERVER = """
import asyncio, sys, pigeon
async def main():
    async with pigeon.connect(sys.argv[1], heartbeat=0.2) as conn:
        async def handle(m):
            print("execute", m.id, flush=True)
            if m.text == "stuck":
                await asyncio.Event().wait()
            return "proc:" + m.text
        await conn.serve("svc", handle)
        print("ready", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


def bound(conn: pigeon.Connection) -> str:
    return str(conn.stats()["bound"][0])


async def answered(client: pigeon.Connection, service: str, payload: str = "?") -> Message:
    """Call until the node relays ``service`` (its servers' Hellos take a moment)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return await client.request(service, payload, timeout=WAIT)
        except pigeon.NoResponders:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def two_servers_behind_a_node() -> AsyncIterator[tuple[pigeon.Connection, ...]]:
    """A node, two server connections to it and a client of it."""
    async with pigeon.connect(bind=ANY_PORT) as node:
        url = bound(node)
        async with (
            pigeon.connect(url) as one,
            pigeon.connect(url) as two,
            pigeon.connect(url) as client,
        ):
            yield node, one, two, client


def test_servers_behind_a_node_share_its_calls() -> None:
    async def scenario() -> None:
        async with two_servers_behind_a_node() as (node, one, two, client):
            await one.serve("svc", lambda m: "one")
            await two.serve("svc", lambda m: "two")
            await answered(client, "svc")
            await wait_until(lambda: len(node.transport.router.relay.peers) == 2, WAIT, "both")  # type: ignore[attr-defined]
            replies = Counter(
                [(await client.request("svc", "x", timeout=WAIT)).text for _ in range(40)]
            )
            assert set(replies) == {"one", "two"}, replies
            assert min(replies.values()) >= 10, replies  # least loaded: they take turns
            info = (await client.request("pigeon.info", b"", timeout=WAIT)).decode()
            assert info["relay"]["services"] == ["svc"]
            assert info["relay"]["servers"] == 2

    asyncio.run(asyncio.wait_for(scenario(), 100))


@pytest.mark.timeout(120)
def test_a_call_moves_on_when_its_server_behind_the_node_dies(tmp_path: Path) -> None:
    """A server process dies (kill -9) in the middle of a relayed call: the
    node moves the call, with the same id, to the other server."""

    async def scenario() -> None:
        async with pigeon.connect(bind=ANY_PORT, heartbeat=0.2) as node:
            url = bound(node)
            doomed = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-c", SERVER, url], stdout=subprocess.PIPE, text=True
            )
            try:
                assert doomed.stdout is not None
                assert doomed.stdout.readline().strip() == "ready"
                # Every peer beats as often as the node: a node reaps a peer
                # that misses three of the node's own heartbeats.
                async with pigeon.connect(url, heartbeat=0.2) as client:
                    await answered(client, "svc")  # through the doomed one: its only server
                    doomed.stdout.readline()  # its "execute" of that call
                    call = asyncio.ensure_future(client.request("svc", "stuck", timeout=WAIT))
                    first = await asyncio.to_thread(doomed.stdout.readline)
                    assert first.startswith("execute")
                    async with pigeon.connect(url, heartbeat=0.2) as survivor:
                        seen: list[str] = []

                        def record(m: Message) -> str:
                            seen.append(m.id)
                            return "survivor"

                        await survivor.serve("svc", record)
                        await wait_until(
                            lambda: len(node.transport.router.relay.peers) == 2,
                            WAIT,
                            "the survivor",  # type: ignore[attr-defined]
                        )
                        doomed.kill()
                        doomed.wait(WAIT)
                        reply = await call
                        assert reply.text == "survivor"
                        assert seen == [first.split()[1]]  # the same request id
            finally:
                if doomed.poll() is None:
                    doomed.kill()
                    doomed.wait(WAIT)
                if doomed.stdout is not None:
                    doomed.stdout.close()

    asyncio.run(asyncio.wait_for(scenario(), 110))


def test_a_relayed_call_keeps_its_deadline() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def slow(message: Message) -> str:
            assert message.deadline is not None and message.deadline < time.time() + 1.0
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "late"

        async with pigeon.connect(bind=ANY_PORT) as node:
            url = bound(node)
            async with pigeon.connect(url) as server, pigeon.connect(url) as client:
                await server.serve("slow", slow)
                await server.serve("probe", lambda m: "here")
                await answered(client, "probe")
                started = time.monotonic()
                with pytest.raises(pigeon.Timeout):
                    await client.request("slow", "x", timeout=0.5)
                assert time.monotonic() - started < 5.0
                await asyncio.wait_for(cancelled.wait(), WAIT)  # the server stopped too

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_a_server_behind_a_node_drains_with_no_failed_call() -> None:
    async def scenario() -> None:
        async with two_servers_behind_a_node() as (node, one, two, client):
            server_one = await one.serve("svc", lambda m: "one")
            await two.serve("svc", lambda m: "two")
            await answered(client, "svc")
            failures: list[BaseException] = []
            answers: Counter[str] = Counter()
            stop = asyncio.Event()

            async def caller() -> None:
                while not stop.is_set():
                    try:
                        answers[(await client.request("svc", "x", timeout=WAIT)).text] += 1
                    except pigeon.PigeonError as exc:
                        failures.append(exc)

            before = server_one.stats()["handled"]  # the probe's call, maybe
            callers = [asyncio.ensure_future(caller()) for _ in range(5)]
            await wait_until(lambda: answers["one"] >= 20, WAIT, "load on one")
            await server_one.drain(grace=WAIT)
            after = answers["two"]
            await wait_until(lambda: answers["two"] >= after + 50, WAIT, "calls after")
            stop.set()
            await asyncio.gather(*callers)
            assert failures == []
            handled = server_one.stats()["handled"] - before
            assert answers["one"] == handled  # nothing ran on one after it withdrew

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_only_the_server_a_call_went_to_may_answer_it() -> None:
    """A peer of the node that answers another's call (it learned the id)
    is ignored: the caller gets the real server's answer."""

    async def scenario() -> None:
        release = asyncio.Event()
        ids: list[str] = []

        async def held(message: Message) -> str:
            ids.append(message.id)
            await release.wait()
            return "real"

        async with pigeon.connect(bind=ANY_PORT) as node:
            url = bound(node)
            async with pigeon.connect(url) as server, pigeon.connect(url) as client:
                await server.serve("svc", held)
                await server.serve("probe", lambda m: "here")
                await answered(client, "probe")
                call = asyncio.ensure_future(client.request("svc", "x", timeout=WAIT))
                await wait_until(lambda: bool(ids), WAIT, "the call to start")
                ctx = zmq.asyncio.Context()
                forger = ctx.socket(zmq.DEALER)
                try:
                    forger.connect(url)
                    hello = frames.Hello("forger", "s", [])
                    await forger.send(frames.encode(hello))
                    await forger.recv()  # the node's Hello: it knows us now
                    fake = Message(id="fake", body=b"forged")
                    await forger.send(frames.encode(frames.Reply(ids[0], fake)))
                    await asyncio.sleep(0.3)
                    assert not call.done()
                    release.set()
                    assert (await call).text == "real"
                finally:
                    forger.close(0)
                    ctx.term()
                assert node.stats()["relay"]["late_replies"] == 1  # the forgery, dropped

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_the_acl_decides_who_may_serve_behind_a_node(tmp_path: Path) -> None:
    for name in ("node", "server", "impostor", "client"):
        new_keys(tmp_path / name)
    acl = tmp_path / "acl.toml"
    acl.write_text(
        """
[clients.server]
key = "server.key"
serve = ["svc"]

[clients.impostor]
key = "impostor.key"
call = ["nothing"]

[clients.client]
key = "client.key"
call = ["svc"]
"""
    )

    def peer(url: str, name: str) -> pigeon.Connection:
        return pigeon.connect(
            url, key=str(tmp_path / f"{name}.key_secret"), server_key=str(tmp_path / "node.key")
        )

    async def scenario() -> None:
        secret = str(tmp_path / "node.key_secret")
        async with pigeon.connect(bind=ANY_PORT, key=secret, allow=str(acl)) as node:
            url = bound(node)
            async with (
                peer(url, "impostor") as impostor,
                peer(url, "server") as server,
                peer(url, "client") as client,
            ):
                await impostor.serve("svc", lambda m: "impostor")
                await server.serve("svc", lambda m: "server")
                await answered(client, "svc")
                replies = {(await client.request("svc", "x", timeout=WAIT)).text for _ in range(20)}
                assert replies == {"server"}
                assert node.stats()["relay"]["refused_services"] >= 1

    asyncio.run(asyncio.wait_for(scenario(), 100))
