"""Fault tests with real processes and sockets: kill -9 mid-message and
mid-request, and garbage on the wire."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import zmq

import pigeon
from pigeon._core import frames
from pigeon.message import make_message
from pigeon.testing.conformance import wait_until

FAULTPROC = str(Path(__file__).with_name("faultproc.py"))


def free_tcp() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class Child:
    """A child process whose JSON-line events are read in a thread-free way."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, FAULTPROC, *args], stdout=subprocess.PIPE)
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        self.events: list[dict] = []
        self._buffer = ""

    def poll(self) -> list[dict]:
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
        except BlockingIOError:
            chunk = b""
        if chunk:
            self._buffer += chunk.decode()
            *lines, self._buffer = self._buffer.split("\n")
            self.events.extend(json.loads(line) for line in lines if line)
        return self.events

    def has(self, kind: str) -> bool:
        return any(e["ev"] == kind for e in self.poll())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def children():
    started: list[Child] = []

    def start(*args: str) -> Child:
        child = Child(*args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def test_worker_killed_mid_message_is_redelivered_marked(children) -> None:
    url = free_tcp()
    queue = "jobs"

    async def scenario() -> None:
        got: list[pigeon.Message] = []
        async with pigeon.connect(bind=url, heartbeat=0.2) as host:
            doomed = children("hanging_worker", url, queue)
            await wait_until(lambda: doomed.has("ready"), 10, "the worker to start")
            await host.send(queue, "important")
            await wait_until(lambda: doomed.has("got"), 5, "the first delivery")
            first = next(e for e in doomed.events if e["ev"] == "got")
            assert first["redelivered"] is False
            async with pigeon.connect(url, heartbeat=0.2) as survivor:
                await survivor.consume(queue, lambda d: got.append(d.message))
                await asyncio.sleep(0.3)
                assert got == []  # still leased to the doomed worker
                doomed.kill()
                await wait_until(lambda: len(got) == 1, 5, "the redelivery")
            message = got[0]
            assert message.id == first["id"] and message.text == "important"
            assert message.redelivered and message.attempt == 2
            stats = host.stats()
            assert stats["peers_lost"] >= 1
            assert stats["queues"][queue]["consumers_lost"] == 1
            assert stats["queues"][queue]["acked"] == 1

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_server_killed_mid_request_call_succeeds_elsewhere(children) -> None:
    hanging_url, healthy_url = free_tcp(), free_tcp()

    async def scenario() -> None:
        hanging = children("server", hanging_url, "hanging", "hang")
        await wait_until(lambda: hanging.has("ready"), 10, "the first server")
        async with pigeon.connect([hanging_url, healthy_url], heartbeat=0.2) as client:
            call = asyncio.ensure_future(client.request("svc", "ping", timeout=10.0))
            await wait_until(
                lambda: hanging.has("execute"), 5, "the call to reach the first server"
            )
            healthy = children("server", healthy_url, "healthy", "echo")
            await wait_until(lambda: healthy.has("ready"), 10, "the second server")
            await asyncio.sleep(0.5)  # let the client hear the second server
            started = time.monotonic()
            hanging.kill()
            reply = await call
            assert reply.text == "healthy:ping"
            assert time.monotonic() - started < 5.0
            executions = [e for c in (hanging, healthy) for e in c.poll() if e["ev"] == "execute"]
            # Same request id on both servers, once each: nobody ran it twice.
            assert [e["server"] for e in executions] == ["hanging", "healthy"]
            assert len({e["id"] for e in executions}) == 1
            assert client.stats()["request_retries"] == 1

    asyncio.run(asyncio.wait_for(scenario(), 40))


def test_no_responders_within_a_second() -> None:
    async def scenario() -> None:
        async with pigeon.connect(free_tcp()) as client:  # nobody listens there
            started = time.monotonic()
            with pytest.raises(pigeon.NoResponders):
                await client.request("svc", "x", timeout=10.0)
            assert time.monotonic() - started < 1.0

    asyncio.run(scenario())


def _raw_dealer(url: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 2000)
    sock.connect(url)
    return sock


async def _receive_frames(sock: zmq.Socket, count: int, kind: type | None = None) -> list:
    """Frames from a raw socket (unpacking Batches) until ``count`` of ``kind``."""
    loop = asyncio.get_running_loop()
    got: list = []
    while len(got) < count:
        data = await loop.run_in_executor(None, sock.recv)
        got += [f for f in frames.decode_all(data) if kind is None or isinstance(f, kind)]
    return got


def test_malformed_input_is_counted_and_the_node_keeps_serving() -> None:
    url = free_tcp()

    async def scenario() -> None:
        async with pigeon.connect(bind=url, max_message_size=1024) as node:
            await node.serve("echo", lambda m: m.text)
            raw = _raw_dealer(url)
            bad_frames = [
                b"",  # empty
                b"\x00\x01\x02garbage",  # unknown version 0
                b"\x07" + msgspec.msgpack.encode([2, "q", []]),  # unknown version 7
                b"\x01not msgpack at all \xff\xfe",  # right version, garbage body
                b"\x01" + msgspec.msgpack.encode([2, 123]),  # wrong shape for Send
                b"\x01" + msgspec.msgpack.encode([99, "x"]),  # unknown tag
                frames.encode(frames.Deliver("q", [])),  # a host-only frame from a peer
            ]
            for data in bad_frames:
                raw.send(data)
            raw.send_multipart([b"two", b"parts"])
            decoded = await _receive_frames(raw, len(bad_frames))
            assert all(isinstance(f, (frames.Error, frames.Hello)) for f in decoded)
            assert sum(isinstance(f, frames.Error) for f in decoded) >= len(bad_frames) - 1
            # Raw bytes straight into the TCP port, not even ZMTP.
            host, port = url.removeprefix("tcp://").split(":")
            with socket.create_connection((host, int(port))) as tcp:
                tcp.sendall(os.urandom(4096))
            # A frame over the size limit: libzmq drops that connection.
            big = _raw_dealer(url)
            big.send(b"\x01" + b"x" * 100_000)
            # Everyone else is still served.
            async with pigeon.connect(url) as client:
                reply = await client.request("echo", "still here", timeout=5.0)
                assert reply.text == "still here"
                got: list[str] = []
                await client.consume("q", lambda d: got.append(d.message.text))
                await node.send("q", "work")
                await wait_until(lambda: got == ["work"], 5, "a delivery after the garbage")
            stats = node.stats()
            assert stats["protocol_errors"] >= len(bad_frames) - 1
            assert stats["malformed_frames"] >= 1
            raw.close()
            big.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_retried_request_id_runs_the_handler_once() -> None:
    url = free_tcp()

    async def scenario() -> None:
        runs: list[str] = []

        async def handler(message: pigeon.Message) -> str:
            runs.append(message.id)
            await asyncio.sleep(0.2)
            return "done"

        async with pigeon.connect(bind=url) as node:
            await node.serve("once", handler)
            raw = _raw_dealer(url)
            request = frames.Request("rid-1", "once", make_message("x", message_id="rid-1"), 5.0)
            raw.send(frames.encode(request))
            await asyncio.sleep(0.05)
            raw.send(frames.encode(request))  # while running
            answers = [f for f in await _receive_frames(raw, 2, frames.Reply)]
            raw.send(frames.encode(request))  # after it finished: from the cache
            answers += await _receive_frames(raw, 1, frames.Reply)
            assert runs == ["rid-1"]
            assert [a.message.text for a in answers] == ["done"] * 3
            raw.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_nonsense_values_in_valid_frames_are_refused() -> None:
    url = free_tcp()

    async def scenario() -> None:
        async with pigeon.connect(bind=url) as node:
            raw = _raw_dealer(url)
            raw.send(frames.encode(frames.Consume("q", 1, float("nan"), 0)))
            raw.send(frames.encode(frames.Consume("q", 0, 1.0, 0)))
            replies = await _receive_frames(raw, 3)
            assert sum(isinstance(r, frames.Error) for r in replies) == 2
            async with pigeon.connect(url) as client:
                got: list[str] = []
                await client.consume("q", lambda d: got.append(d.message.text))
                await node.send("q", "fine")
                await wait_until(lambda: got == ["fine"], 5, "a delivery to the good consumer")
            raw.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_stuck_but_alive_server_is_retried_elsewhere_after_attempt_timeout() -> None:
    stuck_url, healthy_url = free_tcp(), free_tcp()

    async def scenario() -> None:
        runs: list[str] = []

        async def stuck(message: pigeon.Message) -> str:
            runs.append("stuck")
            await asyncio.sleep(30)
            return "late"

        async def healthy(message: pigeon.Message) -> str:
            runs.append("healthy")
            return "fine"

        async with (
            pigeon.connect(bind=stuck_url, heartbeat=0.2) as a,
            pigeon.connect(bind=healthy_url, heartbeat=0.2) as b,
        ):
            await a.serve("svc", stuck)
            await b.serve("svc", healthy)
            # The stuck server keeps heartbeating, so only attempt_timeout
            # moves a call on; every call must end at the healthy one.
            async with pigeon.connect([stuck_url, healthy_url], attempt_timeout=0.3) as client:
                links = lambda: client.stats()["links"].values()  # noqa: E731
                await wait_until(lambda: all(link["up"] for link in links()), 5, "both links")
                started = time.monotonic()
                replies = set()
                for _ in range(4):
                    replies.add((await client.request("svc", "y", timeout=5.0)).text)
                assert replies == {"fine"}
                assert time.monotonic() - started < 4 * 0.3 + 2.0
                assert runs.count("healthy") == 4
                assert "stuck" in runs  # it got calls, and they moved on
                assert client.stats()["request_retries"] == runs.count("stuck")

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_durable_outbox_delivers_what_it_accepted_across_a_producer_crash(
    children, tmp_path
) -> None:
    url, outbox = free_tcp(), str(tmp_path / "outbox.db")

    async def scenario() -> None:
        # No host yet: the producer accepts into its outbox on disk, then dies.
        first = children("outbox_producer", url, outbox, "50")
        await wait_until(
            lambda: sum(e["ev"] == "accepted" for e in first.poll()) == 50, 15, "50 accepted"
        )
        first.kill()
        got: list[str] = []
        async with pigeon.connect(bind=url, heartbeat=0.2) as host:
            await host.consume("jobs", lambda d: got.append(d.message.id))
            # A new run of the producer finds them on disk and delivers them.
            second = children("outbox_producer", url, outbox, "0")
            await wait_until(lambda: second.has("ready"), 10, "the producer to restart")
            assert next(e for e in second.events if e["ev"] == "ready")["restored"] == 50
            await wait_until(lambda: len(set(got)) == 50, 10, "all 50 delivered")
        assert sorted(set(got)) == sorted(f"outbox-{i}" for i in range(50))

    asyncio.run(asyncio.wait_for(scenario(), 40))


def test_a_durable_outbox_retries_a_full_host_instead_of_failing(tmp_path) -> None:
    url = free_tcp()

    async def scenario() -> None:
        async with (
            pigeon.connect(bind=url, max_length=2) as host,
            pigeon.connect(url, outbox=str(tmp_path / "o.db"), heartbeat=0.2) as producer,
        ):
            for i in range(5):
                await producer.send("q", str(i))  # accepted on disk at once
            await asyncio.sleep(0.3)
            assert host.stats()["queues"]["q"]["ready"] == 2  # the rest were refused
            got: list[str] = []
            await host.consume("q", lambda d: got.append(d.message.text))
            await wait_until(lambda: sorted(got) == ["0", "1", "2", "3", "4"], 10, "all five")
            assert producer.stats()["outbox"]["refused_retried"] >= 3
            await producer.flush(5)

    asyncio.run(asyncio.wait_for(scenario(), 30))
