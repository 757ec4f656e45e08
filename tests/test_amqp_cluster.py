"""amqp:// against a three-node RabbitMQ cluster the tests start themselves.

Beside the shared node (rabbit@localhost on 5672), which is not touched, run
three nodes of the test's own: their own node names, Erlang cookie (a HOME
of their own), config, mnesia and log directories under the test's tmp
dir, AMQP and distribution ports picked free on 127.0.0.1, and an empty
rabbitmq-env.conf (the system's names the shared node). They form one
cluster at boot by peer discovery (``classic_config``): the first is started
alone, the two others join it. Only the epmd port mapper (127.0.0.1:4369) is
shared: every Erlang node on the machine registers with it, and registering
changes nothing for the others. Every node started is stopped by its process
group (the PID it was started as) at the end, whatever happened.

pigeon's work queues are quorum queues by default; on three nodes each has
three members (a leader and two followers). What is proved here:

* the conformance suite passes with hosts and clients on different nodes;
* killing (-9) a follower, then the queue's leader, mid-stream loses no
  confirmed message, duplicates are all flagged redelivered, and clients
  on the nodes killed carry on from the node left (a URL naming all three
  nodes; see
  :func:`test_confirmed_messages_survive_killing_a_node_and_the_leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brokers
import pytest

import pigeon
from pigeon.errors import ConfigurationError, DeliveryError, Timeout, TransportError
from pigeon.message import new_id
from pigeon.testing import conformance
from pigeon.testing.history import HistoryWriter, check, load_history

pytest.importorskip("aio_pika")

# Booting three nodes takes 10 to 30 s on a 2-core machine (most of it the
# first node), restarting one 5 to 15 s: the bound is for a busy machine.
pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(180)]

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
BOOT_TIMEOUT = 90.0  # seconds, per node
STOP_TIMEOUT = 20.0


def rabbitmq_binaries() -> tuple[str, str]:
    """rabbitmq-server and rabbitmqctl, as the scripts that run as the calling
    user (Debian's /usr/sbin ones switch to the rabbitmq user)."""
    found = [str(RABBITMQ_BIN / name) for name in ("rabbitmq-server", "rabbitmqctl")]
    if not all(os.access(path, os.X_OK) for path in found):
        brokers.unavailable(f"no RabbitMQ in {RABBITMQ_BIN} to run a cluster of the test's own")
    return found[0], found[1]


# -- the cluster ---------------------------------------------------------------


@dataclass
class Node:
    """One RabbitMQ node; its ports are kept across restarts."""

    short: str
    name: str  # the Erlang node name, NAME@localhost
    directory: Path
    port: int = 0
    dist_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "node.out"


def cluster_url(*nodes: Node) -> str:
    """One URL naming ``nodes``, tried in this order."""
    return f"amqp://guest:guest@{','.join(node.host for node in nodes)}/"


class RabbitCluster:
    """Three RabbitMQ nodes of the test's own forming one cluster."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.server, self.ctl_binary = rabbitmq_binaries()
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.home = directory / "home"
        self.nodes = [
            Node(f"n{i}", f"pigeon-cl-{tag}-n{i}@localhost", directory / f"n{i}")
            for i in range(1, size + 1)
        ]
        self.home.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
        # One cookie for the three (they must share it), none the shared
        # node knows; written before any boots so none races to make it.
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        os.chmod(cookie, 0o400)

    def node(self, short: str) -> Node:
        (found,) = [node for node in self.nodes if node.short == short or node.name == short]
        return found

    # -- starting and stopping --------------------------------------------

    def start(self) -> None:
        brokers.retry_on_port_clash(self._start_once, attempts=3)

    def _start_once(self) -> None:
        ports: set[int] = set()
        while len(ports) < 2 * len(self.nodes):
            ports.add(brokers.free_port())
        picked = iter(sorted(ports))
        for node in self.nodes:
            node.port, node.dist_port = next(picked), next(picked)
        try:
            # The first boots alone and forms the cluster; the others find it
            # running and join it (booted together, each might form its own).
            first, *others = self.nodes
            self._launch(first)
            self._wait_up(first)
            for node in others:
                self._launch(node)
            for node in others:
                self._wait_up(node)
        except BaseException:
            self.stop()
            raise

    def env(self, node: Node) -> dict[str, str]:
        env_file = node.directory / "rabbitmq-env.conf"
        env_file.write_text("")  # not the system's: it names the shared node
        plugins = node.directory / "enabled_plugins"
        plugins.write_text("[].\n")
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        return {
            **keep,
            "HOME": str(self.home),  # the cookie of our cluster
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_CONFIG_FILE": str(node.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(node.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.directory / "log"),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_NODE_PORT": str(node.port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _config(self, node: Node) -> str:
        peers = "".join(
            f"cluster_formation.classic_config.nodes.{i} = {n.name}\n"
            for i, n in enumerate(self.nodes, 1)
        )
        return (
            f"listeners.tcp.default = 127.0.0.1:{node.port}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n" + peers
        )

    def _launch(self, node: Node) -> None:
        (node.directory / "rabbitmq.conf").write_text(self._config(node))
        with open(node.log, "ab") as out:
            node.process = subprocess.Popen(
                [self.server],
                env=self.env(node),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=node.directory,
                start_new_session=True,  # its own process group: the Erlang VM and helpers
            )

    def _wait_up(self, node: Node) -> None:
        """The AMQP listener opens last in a node's boot, after it joined."""
        assert node.process is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not brokers.reachable(node.url):
            code = node.process.poll()
            if code is not None or time.monotonic() > deadline:
                text = node.log.read_text(errors="replace")
                if brokers.port_taken(text) or "eaddrinuse" in text:
                    raise brokers.PortClash(text)
                pytest.fail(
                    brokers.describe(f"RabbitMQ node {node.short} did not start", code, node.log)
                )
            time.sleep(0.1)

    def kill(self, node: Node) -> None:
        """SIGKILL to the node's process group (its PID): no shutdown."""
        process, node.process = node.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)

    def restart(self, node: Node) -> None:
        assert node.process is None, f"{node.short} is running"
        self._launch(node)
        self._wait_up(node)

    def stop(self) -> None:
        """Kill every node still running, by its process group. Their data
        is the test's tmp dir: there is nothing to shut down cleanly for."""
        for node in self.nodes:
            self.kill(node)

    # -- asking the cluster --------------------------------------------------

    def ctl(self, node: Node, *args: str) -> str:
        """rabbitmqctl against ``node``; its output."""
        done = subprocess.run(
            [self.ctl_binary, "-n", node.name, *args],
            env=self.env(node),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, brokers.completed(done, f"rabbitmqctl {' '.join(args)}")
        return done.stdout

    def queue(self, queue: str, asking: Node) -> dict[str, Any]:
        """The queue's type, leader and members, as ``asking`` sees them."""
        out = self.ctl(
            asking,
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "--formatter",
            "json",
            "--quiet",
        )
        for row in json.loads(out):
            if row.get("name") == queue:
                return dict(row)
        raise AssertionError(f"no queue {queue!r} on {asking.short}: {out}")


@contextlib.contextmanager
def started(directory: Path) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    with started(tmp_path_factory.mktemp("rabbit-cluster")) as running:
        yield running


# -- several nodes in one URL (no broker needed) ---------------------------------


def test_several_nodes_in_one_url_share_login_vhost_and_query() -> None:
    from pigeon.transports.amqp.options import parse

    options, urls = parse("amqp://u:pw@a:5672,b:5673,c/vh?heartbeat=5", {})
    assert [str(u) for u in urls] == [
        "amqp://u:pw@a:5672/vh?heartbeat=5",
        "amqp://u:pw@b:5673/vh?heartbeat=5",
        "amqp://u:pw@c/vh?heartbeat=5",
    ]
    assert options.address == "amqp://a:5672,b:5673,c/vh"  # no password
    _, urls = parse("amqp://a:1,b:2/", {"user": "u", "password": "pw"})
    assert [(u.user, u.password, u.port) for u in urls] == [("u", "pw", 1), ("u", "pw", 2)]
    _, urls = parse("amqp://a:1/", {})
    assert [str(u) for u in urls] == ["amqp://a:1/"]  # one node: as before


@pytest.mark.parametrize(
    "url", ["amqp://a:1,,b/", "amqp://a:1,b:x/", "amqp://a:1,b:2:3/", "amqp://,a:1/"]
)
def test_a_bad_node_in_the_list_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        pigeon.connect(url)


# -- on the healthy cluster ------------------------------------------------------


class ClusterSetup(conformance.TransportSetup):
    """Hosts (``node(i)``) on one node, clients on the next: every message
    and request crosses from node to node."""

    name = "amqp-cluster"

    def __init__(self, cluster: RabbitCluster) -> None:
        self.urls = [node.url for node in cluster.nodes]

    def node(self, index: int = 0, **options: Any) -> pigeon.Connection:
        return pigeon.connect(self.urls[index % len(self.urls)], **options)

    def client(self, nodes: int = 1, **options: Any) -> pigeon.Connection:
        return pigeon.connect(self.urls[nodes % len(self.urls)], **options)


def test_a_queue_has_a_member_on_every_node(cluster: RabbitCluster) -> None:
    queue = conformance.unique("members")

    async def main() -> None:
        async with pigeon.connect(cluster.nodes[0].url) as conn:
            await conn.send(queue, b"kept three times")

    asyncio.run(main())
    info = cluster.queue(queue, cluster.nodes[1])
    assert info["type"] == "quorum"
    assert sorted(info["members"]) == sorted(n.name for n in cluster.nodes)
    assert info["leader"] in info["members"]


def test_first_connect_skips_a_node_that_is_down(cluster: RabbitCluster) -> None:
    queue = conformance.unique("skip")

    async def main() -> None:
        with brokers.Unlistened() as down:  # refuses connections
            dead = down.removeprefix("tcp://")
            url = f"amqp://guest:guest@{dead},{cluster.nodes[1].host}/"
            async with pigeon.connect(url) as conn:
                assert conn.transport.url == f"amqp://{dead},{cluster.nodes[1].host}/"
                await conn.send(queue, b"through the second node")
                got: list[bytes] = []
                await conn.consume(queue, lambda d: got.append(d.message.body))
                await conformance.wait_until(lambda: got == [b"through the second node"])

    asyncio.run(main())


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
def test_conformance(cluster: RabbitCluster, scenario: Any) -> None:
    conformance.run(scenario, ClusterSetup(cluster), timeout=30)


# -- killing nodes mid-stream ----------------------------------------------------

QUEUE = "jobs"


@dataclass
class Run:
    """What the producers and workers did, as they did it."""

    confirmed: set[str] = field(default_factory=set)
    processed: set[str] = field(default_factory=set)
    unconfirmed: dict[str, str] = field(default_factory=dict)
    refused: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def grows(self, what: set[str], by: int, timeout: float, why: str) -> None:
        target = len(what) + by
        await conformance.wait_until(lambda: len(what) >= target, timeout, why)


async def produce(run: Run, conn: pigeon.Connection, name: str, history: HistoryWriter) -> None:
    """One message after another, each awaited until confirmed."""
    seq = 0
    while not run.stop.is_set():
        seq += 1
        message_id = new_id()
        body = f"{name} {seq}".encode()
        history.send_invoke(QUEUE, message_id, producer=name, seq=seq, body=body)
        try:
            await conn.send(QUEUE, body, message_id=message_id, timeout=60)
        except DeliveryError as exc:  # basic.nack: the broker did not take it
            history.send_fail(QUEUE, message_id, exc)
            run.refused += 1
            await asyncio.sleep(0.05)  # no quorum: do not spin
        except (Timeout, TransportError) as exc:
            history.send_info(QUEUE, message_id, exc)
            run.unconfirmed[message_id] = f"{type(exc).__name__}: {exc}"
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
        await asyncio.sleep(0.001)

    return handle


def test_confirmed_messages_survive_killing_a_node_and_the_leader(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    """Two producer connections (three senders each, every send awaited
    until confirmed) and two workers on a quorum queue with three members;
    kill -9 a follower node, then the queue's leader.

    Each client's URL names the three nodes; half the clients start on the
    follower killed first, half on the leader, and all must carry on from
    the third node, which is never killed. After the second kill one member
    of three is left: no quorum, so no leader, and nothing can be stored or
    confirmed; the test asserts that no send is confirmed then (sends on a
    channel opened then are refused: each is recorded as failed, and the
    checker requires that none of those arrives). The first node killed is
    started again, quorum returns, and every send confirmed at any time must
    be processed, every duplicate flagged redelivered (the history checker
    decides). The second node killed stays down.

    Acks are not recorded (``ack_ok``): an AMQP ack is not confirmed, so one
    lost with the leader comes back, flagged redelivered.
    """
    for node in cluster.nodes:  # the kill test may run after others, never before them
        if node.process is None:
            cluster.restart(node)
    histories = tmp_path / "history"
    histories.mkdir()
    # The queue's leader is where it is declared (RabbitMQ's client-local
    # placement), but it is read from the cluster, not assumed.
    asyncio.run(_declare(cluster.nodes[0].url))
    info = cluster.queue(QUEUE, cluster.nodes[0])
    assert info["type"] == "quorum" and len(info["members"]) == 3, info
    leader = cluster.node(info["leader"])
    survivor, first = [n for n in cluster.nodes if n is not leader]
    # Losing a follower does not move a quorum queue's leader (two of three
    # members still agree on it), so the leader read here is the one killed
    # second. (Not read again: rabbitmqctl takes 5 to 15 s to start.)
    report = asyncio.run(_kill_run(cluster, survivor, first, leader, histories))
    result = check(load_history(sorted(histories.glob("*.jsonl"))))
    report["check"] = result.summary()
    print(json.dumps(report, indent=2))  # shown with pytest -s
    assert result.valid, f"{result}\n{json.dumps(report, indent=2)}"
    assert result.counts["acknowledged"] == report["confirmed"] and not result.lost
    assert report["confirmed_without_quorum"] == 0, report
    # Every client lost its node and carried on from another.
    assert all(n >= 1 for n in report["reconnects"].values()), report


async def _declare(url: str) -> None:
    async with pigeon.connect(url) as conn:
        worker = await conn.consume(QUEUE, lambda d: None)
        await worker.close()


async def _kill_run(
    cluster: RabbitCluster, survivor: Node, first: Node, leader: Node, histories: Path
) -> dict[str, Any]:
    run = Run()
    nemesis = HistoryWriter(histories / "nemesis.jsonl", process="nemesis")
    writers = [nemesis]
    conns: dict[str, pigeon.Connection] = {}

    def writer(name: str) -> HistoryWriter:
        history = HistoryWriter(histories / f"{name}.jsonl", process=name)
        writers.append(history)
        return history

    producers: list[asyncio.Task[None]] = []
    phases: dict[str, float] = {}  # seconds since the start of the run
    began = time.monotonic()
    # Where each client starts: half on the follower killed first, half on
    # the leader, each followed by the node killed next, so that every
    # client loses its node and ends on the third. The leader's clients
    # reconnect while the queue has no quorum, when RabbitMQ refuses their
    # publishes (see docs/transports-amqp.md, "A cluster").
    starts = {
        "worker-1": cluster_url(first, leader, survivor),
        "worker-2": cluster_url(leader, first, survivor),
        "producer-1": cluster_url(first, leader, survivor),
        "producer-2": cluster_url(leader, first, survivor),
    }
    try:
        for name in ("worker-1", "worker-2"):
            conn = conns[name] = await pigeon.connect(starts[name], reconnect_interval=0.25)
            await conn.consume(QUEUE, handler(run, name, writer(name)), prefetch=16)
        for name in ("producer-1", "producer-2"):
            conn = conns[name] = await pigeon.connect(starts[name], reconnect_interval=0.25)
            for lane in range(1, 4):
                sender = f"{name}.{lane}"
                producers.append(asyncio.create_task(produce(run, conn, sender, writer(sender))))

        await run.grows(run.confirmed, 300, 60, "300 confirmed sends on the healthy cluster")
        await run.grows(run.processed, 1, 30, "the workers to start processing")
        nemesis.nemesis("kill -9 a follower", first.short)
        await asyncio.to_thread(cluster.kill, first)
        phases["follower killed"] = time.monotonic() - began
        await run.grows(run.confirmed, 300, 60, "300 more confirmed with one node down")
        nemesis.nemesis("kill -9 the queue leader", leader.short)
        await asyncio.to_thread(cluster.kill, leader)
        phases["leader killed"] = time.monotonic() - began
        await asyncio.sleep(1.5)  # confirms already on their way are taken in
        before = len(run.confirmed)
        await asyncio.sleep(2.0)
        confirmed_without_quorum = len(run.confirmed) - before

        nemesis.nemesis("restart", first.short)
        await asyncio.to_thread(cluster.restart, first)
        phases["restarted"] = time.monotonic() - began
        await run.grows(run.confirmed, 200, 60, "200 more confirmed once quorum is back")
        run.stop.set()
        await asyncio.wait_for(asyncio.gather(*producers), 70)
        await conformance.wait_until(
            lambda: run.confirmed <= run.processed, 60, "every confirmed message to be processed"
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
        "clients_start_on": {name: url.split("@")[1] for name, url in starts.items()},
        "nodes": {node.short: node.host for node in cluster.nodes},
        "left": survivor.short,
        "killed": [first.short, leader.short],
        "restarted": first.short,
        "confirmed_without_quorum": confirmed_without_quorum,
        "confirmed": len(run.confirmed),
        "processed": len(run.processed),
        "refused": run.refused,
        "unconfirmed": len(run.unconfirmed),
        "unconfirmed_why": sorted({why[:160] for why in run.unconfirmed.values()}),
        "redelivered": {name: s.get("redelivered", 0) for name, s in stats.items()},
        "resent": {name: s.get("resent", 0) for name, s in stats.items()},
        "reconnects": {name: s.get("reconnects", 0) for name, s in stats.items()},
        "channels_renewed": {name: s.get("channels_renewed", 0) for name, s in stats.items()},
    }
