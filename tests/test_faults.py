"""Fault tests with real processes and sockets: kill -9 mid-message and
mid-request, and garbage on the wire.

Every wait here is for a condition, with a bound far above what a quiet
machine needs: these tests run on busy machines too.
"""

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
from brokers import ANY_PORT, PortClash, Unlistened, describe, free_tcp, port_taken
from brokers import retry_on_port_clash as retrying
from faultproc import HEARTBEAT

import pigeon
from pigeon._core import frames
from pigeon.message import make_message
from pigeon.testing.conformance import wait_until

FAULTPROC = str(Path(__file__).with_name("faultproc.py"))
WAIT = 30.0  # upper bound for anything that takes well under a second when quiet


class Child:
    """A faultproc.py process; its JSON-line events are read without threads,
    its stderr goes to a file that every failure about it shows."""

    SCRIPT = FAULTPROC  # the script it runs: ROLE and options follow

    def __init__(self, logs: Path, *args: str) -> None:
        self.name = " ".join(args[:1] + args[2:3])
        self.err = logs / f"{Path(self.SCRIPT).stem}-{os.getpid()}-{id(self)}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, self.SCRIPT, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        self.events: list[dict] = []
        self._buffer = ""

    def describe(self) -> str:
        return describe(f"faultproc {self.name}", self.proc.poll(), self.err, self._buffer)

    def poll(self) -> list[dict]:
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
        except BlockingIOError:
            chunk = b""
        if chunk:
            self._buffer += chunk.decode()
            *lines, self._buffer = self._buffer.split("\n")
            for line in lines:
                if line:
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        raise AssertionError(f"not an event: {line!r}\n{self.describe()}") from None
        return self.events

    def has(self, kind: str) -> bool:
        """Whether the child said ``kind``; fails at once if it died first."""
        if any(e["ev"] == kind for e in self.poll()):
            return True
        if self.proc.poll() is not None:
            self.poll()
            if any(e["ev"] == kind for e in self.events):
                return True
            raise AssertionError(f"exited before saying {kind!r}\n{self.describe()}")
        return False

    def event(self, kind: str) -> dict:
        return next(e for e in self.poll() if e["ev"] == kind)

    async def wait(self, kind: str, timeout: float = WAIT) -> dict:
        try:
            await wait_until(lambda: self.has(kind), timeout, f"{self.name} to say {kind!r}")
        except AssertionError as exc:
            if "timed out" in str(exc):
                raise AssertionError(f"{exc}\n{self.describe()}") from None
            raise
        return self.event(kind)

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stdin.close()  # type: ignore[union-attr]


@pytest.fixture
def children(tmp_path):
    started: list[Child] = []

    def start(*args: str) -> Child:
        child = Child(tmp_path, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def bound(conn: pigeon.Connection) -> str:
    """The address a node bound to ``tcp://127.0.0.1:0`` got."""
    return str(conn.stats()["bound"][0])


def links_up(conn: pigeon.Connection) -> bool:
    return all(link["up"] for link in conn.stats()["links"].values())


async def wait_for_service(conn: pigeon.Connection, service: str, timeout: float = WAIT) -> None:
    """Call ``service`` until a call succeeds: then ``conn`` knows a server of it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await conn.request(service, "?", timeout=5.0)
            return
        except (pigeon.NoResponders, pigeon.Timeout):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_worker_killed_mid_message_is_redelivered_marked(children) -> None:
    queue = "jobs"

    async def scenario() -> None:
        got: list[pigeon.Message] = []
        async with pigeon.connect(bind=ANY_PORT, heartbeat=HEARTBEAT) as host:
            url = bound(host)
            doomed = children("hanging_worker", url, queue)
            await doomed.wait("ready")
            await host.send(queue, "important")
            first = await doomed.wait("got")
            assert first["redelivered"] is False
            async with pigeon.connect(url, heartbeat=HEARTBEAT) as survivor:
                await survivor.consume(queue, lambda d: got.append(d.message))
                await wait_until(lambda: links_up(survivor), WAIT, "the survivor's link")
                await asyncio.sleep(0.3)  # time in which nothing may happen
                assert got == []  # still leased to the doomed worker
                doomed.kill()
                # The host notices by missed heartbeats (a few HEARTBEATs).
                await wait_until(lambda: len(got) == 1, WAIT, "the redelivery")
            message = got[0]
            assert message.id == first["id"] and message.text == "important"
            assert message.redelivered and message.attempt == 2
            # The survivor's ack left as it closed; the host reads it soon.
            await wait_until(lambda: host.stats()["queues"][queue]["acked"] == 1, WAIT, "the ack")
            stats = host.stats()
            assert stats["peers_lost"] >= 1
            assert stats["queues"][queue]["consumers_lost"] == 1

    asyncio.run(asyncio.wait_for(scenario(), 100))


@pytest.mark.timeout(120)
def test_server_killed_mid_request_call_succeeds_elsewhere(children) -> None:
    async def scenario() -> None:
        hanging = children("server", ANY_PORT, "hanging", "hang")
        # Up from the start, but serving only when told: the call must go
        # to the hanging server first.
        healthy = children("server", ANY_PORT, "healthy", "echo-on-cue")
        hanging_url = (await hanging.wait("ready"))["url"]
        healthy_url = (await healthy.wait("ready"))["url"]
        async with pigeon.connect([hanging_url, healthy_url], heartbeat=HEARTBEAT) as client:
            await wait_until(lambda: links_up(client), WAIT, "both links")
            call = asyncio.ensure_future(client.request("svc", "ping", timeout=60.0))
            await hanging.wait("execute")
            healthy.tell("serve")
            await healthy.wait("serving")
            # The retry goes only to a server the client knows serves svc:
            # wait until it has heard so (probe is served after svc).
            await wait_for_service(client, "probe")
            started = time.monotonic()
            hanging.kill()
            reply = await call
            assert reply.text == "healthy:ping"
            # Moved on when the connection dropped, long before the call's timeout.
            assert time.monotonic() - started < 20.0
            executions = [e for c in (hanging, healthy) for e in c.poll() if e["ev"] == "execute"]
            # Same request id on both servers, once each: nobody ran it twice.
            assert [e["server"] for e in executions] == ["hanging", "healthy"]
            assert len({e["id"] for e in executions}) == 1
            assert client.stats()["request_retries"] == 1

    asyncio.run(asyncio.wait_for(scenario(), 110))


def test_no_responders_after_the_connect_grace_not_the_timeout() -> None:
    async def scenario(nobody: str) -> None:
        async with pigeon.connect(nobody) as client:
            started = time.monotonic()
            with pytest.raises(pigeon.NoResponders):
                await client.request("svc", "x", timeout=40.0)
            # connect_grace (0.5 s), not the call's timeout.
            assert time.monotonic() - started < 20.0

    with Unlistened() as nobody:
        asyncio.run(scenario(nobody))


def _raw_dealer(url: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
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
    async def scenario() -> None:
        async with pigeon.connect(bind=ANY_PORT, max_message_size=1024) as node:
            url = bound(node)
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
                reply = await client.request("echo", "still here", timeout=WAIT)
                assert reply.text == "still here"
                got: list[str] = []
                await client.consume("q", lambda d: got.append(d.message.text))
                await node.send("q", "work")
                await wait_until(lambda: got == ["work"], WAIT, "a delivery after the garbage")
            stats = node.stats()
            assert stats["protocol_errors"] >= len(bad_frames) - 1
            assert stats["malformed_frames"] >= 1
            raw.close()
            big.close()

    asyncio.run(asyncio.wait_for(scenario(), 50))


def test_a_retried_request_id_runs_the_handler_once() -> None:
    async def scenario() -> None:
        runs: list[str] = []
        release = asyncio.Event()

        async def handler(message: pigeon.Message) -> str:
            runs.append(message.id)
            await release.wait()
            return "done"

        async with pigeon.connect(bind=ANY_PORT) as node:
            await node.serve("once", handler)
            raw = _raw_dealer(bound(node))
            request = frames.Request("rid-1", "once", make_message("x", message_id="rid-1"), 30.0)
            raw.send(frames.encode(request))
            await wait_until(lambda: runs == ["rid-1"], WAIT, "the handler to start")
            raw.send(frames.encode(request))  # while running
            await wait_until(
                lambda: node.stats()["reply_cache_hits"] == 1, WAIT, "the retry to arrive"
            )
            release.set()
            answers = [f for f in await _receive_frames(raw, 2, frames.Reply)]
            raw.send(frames.encode(request))  # after it finished: from the cache
            answers += await _receive_frames(raw, 1, frames.Reply)
            assert runs == ["rid-1"]
            assert [a.message.text for a in answers] == ["done"] * 3
            raw.close()

    asyncio.run(asyncio.wait_for(scenario(), 50))


def test_nonsense_values_in_valid_frames_are_refused() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind=ANY_PORT) as node:
            url = bound(node)
            raw = _raw_dealer(url)
            raw.send(frames.encode(frames.Consume("q", 1, float("nan"), 0)))
            raw.send(frames.encode(frames.Consume("q", 0, 1.0, 0)))
            # Both are out of range, so neither decodes: each is answered
            # with an Error, as any malformed frame is.
            replies = await _receive_frames(raw, 2)
            assert all(isinstance(r, frames.Error) for r in replies), replies
            assert node.stats()["protocol_errors"] == 2
            async with pigeon.connect(url) as client:
                got: list[str] = []
                await client.consume("q", lambda d: got.append(d.message.text))
                await node.send("q", "fine")
                await wait_until(lambda: got == ["fine"], WAIT, "a delivery to the good consumer")
            raw.close()

    asyncio.run(asyncio.wait_for(scenario(), 50))


def test_a_stuck_but_alive_server_is_retried_elsewhere_after_attempt_timeout() -> None:
    async def scenario() -> None:
        runs: list[str] = []

        async def stuck(message: pigeon.Message) -> str:
            runs.append("stuck")
            await asyncio.sleep(60)
            return "late"

        async def healthy(message: pigeon.Message) -> str:
            runs.append("healthy")
            return "fine"

        async with (
            pigeon.connect(bind=ANY_PORT, heartbeat=HEARTBEAT) as a,
            pigeon.connect(bind=ANY_PORT, heartbeat=HEARTBEAT) as b,
        ):
            await a.serve("svc", stuck)
            await b.serve("svc", healthy)
            # The stuck server keeps heartbeating, so only attempt_timeout
            # moves a call on; every call must end at the healthy one.
            async with pigeon.connect(
                [bound(a), bound(b)], attempt_timeout=0.3, heartbeat=HEARTBEAT
            ) as client:
                await wait_until(lambda: links_up(client), WAIT, "both links")
                replies = set()
                for _ in range(4):
                    started = time.monotonic()
                    replies.add((await client.request("svc", "y", timeout=40.0)).text)
                    # Moved on after attempt_timeout, long before the call's timeout.
                    assert time.monotonic() - started < 20.0
                assert replies == {"fine"}
                assert runs.count("healthy") == 4
                assert "stuck" in runs  # it got calls, and they moved on
                assert client.stats()["request_retries"] == runs.count("stuck")

    asyncio.run(asyncio.wait_for(scenario(), 50))


@pytest.mark.timeout(180)
def test_a_durable_outbox_delivers_what_it_accepted_across_a_producer_crash(
    children, tmp_path
) -> None:
    def attempt() -> None:
        # The producer must know the host's address before the host is up,
        # so the port is picked ahead; if someone takes it meanwhile, the
        # whole run starts again on another one.
        url, outbox = free_tcp(), str(tmp_path / f"outbox-{time.monotonic_ns()}.db")

        async def scenario() -> None:
            # No host yet: the producer accepts into its outbox on disk, then dies.
            first = children("outbox_producer", url, outbox, "50")

            def accepted_all() -> bool:
                if sum(e["ev"] == "accepted" for e in first.poll()) == 50:
                    return True
                if first.proc.poll() is not None:
                    raise AssertionError(f"the producer died\n{first.describe()}")
                return False

            await wait_until(accepted_all, WAIT, "50 accepted")
            first.kill()
            got: list[str] = []
            listening = False
            try:
                async with pigeon.connect(bind=url, heartbeat=HEARTBEAT) as host:
                    listening = True
                    await host.consume("jobs", lambda d: got.append(d.message.id))
                    # A new run of the producer finds them on disk and delivers them.
                    second = children("outbox_producer", url, outbox, "0")
                    assert (await second.wait("ready"))["restored"] == 50
                    await wait_until(lambda: len(set(got)) == 50, WAIT, "all 50 delivered")
            except pigeon.TransportError as exc:
                if not listening and port_taken(exc):
                    raise PortClash(str(exc)) from exc
                raise
            assert sorted(set(got)) == sorted(f"outbox-{i}" for i in range(50))

        asyncio.run(asyncio.wait_for(scenario(), 150))

    retrying(attempt, attempts=3)


def test_a_durable_outbox_retries_a_full_host_instead_of_failing(tmp_path) -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind=ANY_PORT, max_length=2) as host:
            async with pigeon.connect(
                bound(host), outbox=str(tmp_path / "o.db"), heartbeat=HEARTBEAT
            ) as producer:
                for i in range(5):
                    await producer.send("q", str(i))  # accepted on disk at once
                # Two fit; the rest are refused, and kept to be tried again.
                await wait_until(
                    lambda: producer.stats()["outbox"]["refused_retried"] >= 3,
                    WAIT,
                    "the full host to refuse three",
                )
                assert host.stats()["queues"]["q"]["ready"] == 2
                got: list[str] = []
                await host.consume("q", lambda d: got.append(d.message.text))
                await wait_until(lambda: sorted(got) == ["0", "1", "2", "3", "4"], WAIT, "all five")
                assert producer.stats()["outbox"]["refused_retried"] >= 3
                await producer.flush(WAIT)

    asyncio.run(asyncio.wait_for(scenario(), 50))


@pytest.mark.timeout(120)
def test_a_frozen_server_starts_nothing_its_callers_gave_up_on(children) -> None:
    """Calls with a 1 s deadline go on while their server is frozen
    (SIGSTOP) for 3 s. On resume it reads them all late: it must start none
    of them (counted in ``expired_requests``), and answer calls made after."""

    async def scenario() -> None:
        server = children("server", ANY_PORT, "frozen", "echo")
        url = (await server.wait("ready"))["url"]
        async with pigeon.connect(url, heartbeat=HEARTBEAT, heartbeat_misses=20) as client:
            await wait_for_service(client, "svc")
            executed_before = len([e for e in server.poll() if e["ev"] == "execute"])
            server.proc.send_signal(signal.SIGSTOP)
            try:
                calls = []
                for i in range(40):  # sent while it is frozen: each times out
                    calls.append(asyncio.ensure_future(client.request("svc", f"c{i}", timeout=1.0)))
                    await asyncio.sleep(0.025)
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                await asyncio.sleep(2.0)  # frozen for 3 s in all
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert all(isinstance(o, pigeon.Timeout) for o in outcomes), outcomes
            reply = await client.request("svc", "after", timeout=10.0)
            assert reply.text == "frozen:after"
            info = await client.request("pigeon.info", b"", timeout=10.0)
            assert info.decode()["expired_requests"] == 40
            executions = [e for e in server.poll() if e["ev"] == "execute"]
            assert len(executions) == executed_before + 1  # only "after"
            assert not any(e["late"] for e in executions), executions

    asyncio.run(asyncio.wait_for(scenario(), 110))
