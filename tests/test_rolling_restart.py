"""A rolling restart of a whole fleet under steady load, with real processes
on tcp loopback: nobody notices.

The fleet: a durable ``pigeon node`` (its own store, a fixed address), three
workers consuming a queue from it, two servers of a service (each on its own
fixed address), a producer sending 100 messages a second through a durable
outbox and a caller making 50 calls a second to both servers (children in
``tests/rollproc.py``). While they run, every worker is restarted in turn
(SIGTERM, wait for it to exit, start a new one), then every server (it
drains), then the node (on the same address and store).

What must hold: every call returned its reply; every message the producer
saw confirmed was processed; a message processed more than once was marked
redelivered every time after the first; every SIGTERM ended its process
cleanly (exit code 0). The counts are printed (``pytest -s`` shows them),
among them calls whose handler ran on two servers: the xfail test at the end
shows why that happens.

Every wait is for a condition, with a bound far above what a quiet machine
needs; nothing here checks speed.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import ANY_PORT, describe, port_taken
from rollproc import HEARTBEAT, QUEUE, SERVICE
from test_cli_node import Node, cli, start_node
from test_drain import bound, wait_until_answered

import pigeon

pytestmark = pytest.mark.slow

ROLLPROC = str(Path(__file__).with_name("rollproc.py"))
WAIT = 30.0  # bound for what takes well under a second on a quiet machine
DRAIN_WAIT = 60.0  # bound for the fleet to catch up with its backlog at the end
WORKERS = 3
SERVERS = 2


def wait_for(
    predicate: Callable[[], bool],
    what: str,
    timeout: float = WAIT,
    detail: Callable[[], str] = str,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail()}")
        time.sleep(0.05)


class Proc:
    """A rollproc.py child. Its JSON-line events go to a file (a pipe nobody
    reads in time would stall it), read here as they come."""

    def __init__(self, logs: Path, role: str, name: str, *args: str) -> None:
        self.name = name
        self.out = logs / f"{name}.out"
        self.err = logs / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, ROLLPROC, role, name, *args], stdout=out, stderr=err
            )
        self.events: list[dict[str, Any]] = []
        self._read = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        with open(self.out, "rb") as out:
            out.seek(self._read)
            chunk = out.read()
        self._read += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not an event: {line!r}\n{self.describe()}") from None
        return self.events

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.poll() if e["ev"] == kind]

    def describe(self) -> str:
        return describe(f"rollproc {self.name}", self.popen.poll(), self.err)

    def said(self, kind: str) -> bool:
        """Whether the child said ``kind``; fails at once if it died first."""
        if self.of(kind):
            return True
        if self.popen.poll() is not None and not self.of(kind):
            raise AssertionError(f"exited before saying {kind!r}\n{self.describe()}")
        return False

    def wait_said(self, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.said(kind):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {self.name} to say {kind!r}\n"
                    f"{self.describe()}"
                )
            time.sleep(0.05)
        return self.of(kind)[0]

    def stop(self, timeout: float = WAIT) -> float:
        """SIGTERM; wait for a clean exit (code 0). Returns the seconds it took."""
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running {timeout} s after SIGTERM\n{self.describe()}"
            ) from None
        assert code == 0, f"{self.name} exited with {code} after SIGTERM\n{self.describe()}"
        self.poll()
        return time.monotonic() - started

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


class Fleet:
    """Every process of the test, so each is killed (by its pid) at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.store = str(tmp / "queues.db")
        self.procs: list[Proc] = []
        self.nodes: list[Node] = []
        self.node: Node | None = None
        self.workers: list[Proc] = []
        self.servers: list[Proc] = []
        self.server_urls: list[str] = []
        self.stopped: list[Proc] = []  # workers and servers stopped by SIGTERM

    def start(self, role: str, name: str, *args: str) -> Proc:
        proc = Proc(self.logs, role, name, *args)
        self.procs.append(proc)
        return proc

    def start_node(self, url: str) -> Node:
        node = start_node(url, self.store, self.logs)
        self.nodes.append(node)
        self.node = node
        return node

    def start_server(self, name: str, url: str) -> Proc:
        """Start a server on ``url``; on the address of one just stopped,
        retry while the bind is refused (someone may hold it for a moment)."""
        deadline = time.monotonic() + WAIT
        while True:
            proc = self.start("server", name, url)  # a failed try is killed at the end too
            try:
                proc.wait_said("ready")
                return proc
            except AssertionError:
                if proc.popen.poll() is None or not port_taken(proc.describe()):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def processed(self) -> list[dict[str, Any]]:
        """What every worker, old and new, said it processed."""
        workers = [p for p in self.procs if p.name.startswith("w")]
        return [e for p in workers for e in p.of("processed")]

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
            node.proc.wait(10)
            if node.proc.stdout is not None:
                node.proc.stdout.close()


def number(message_id: str) -> int:
    """The send count in a producer's message id (``producer-N``)."""
    return int(message_id.rsplit("-", 1)[1])


@pytest.mark.timeout(300)
def test_rolling_restart_of_workers_servers_and_the_node_goes_unnoticed(tmp_path) -> None:
    fleet = Fleet(tmp_path)
    began = time.monotonic()
    phases: dict[str, float] = {}
    try:
        node = fleet.start_node(ANY_PORT)
        node_url = node.url  # every later node comes back on this address
        # The first servers bind any free port; their restarts reuse it.
        fleet.servers = [fleet.start("server", f"s{i}.1", ANY_PORT) for i in range(1, SERVERS + 1)]
        fleet.server_urls = [server.wait_said("ready")["url"] for server in fleet.servers]
        for i in range(1, WORKERS + 1):
            fleet.workers.append(fleet.start("worker", f"w{i}.1", node_url))
        caller = fleet.start("caller", "caller", *fleet.server_urls)
        producer = fleet.start("producer", "producer", node_url, str(tmp_path / "outbox.db"))
        for proc in (*fleet.workers, caller, producer):
            proc.wait_said("ready")

        def answered_by(name: str) -> int:
            return sum(1 for c in caller.of("call") if c.get("server") == name)

        # Warm: every worker takes messages, every server answers calls.
        for worker in fleet.workers:
            wait_for(lambda w=worker: bool(w.of("processed")), f"{worker.name} to process")
        for server in fleet.servers:
            wait_for(lambda s=server: answered_by(s.name) > 0, f"{server.name} to answer")
        phases["started"] = time.monotonic() - began

        # Workers, one by one: SIGTERM (App.run drains), then a new one,
        # which must be taking messages before the next goes.
        for i in range(WORKERS):
            old = fleet.workers[i]
            old.stop()
            assert old.of("stopped"), old.describe()
            fleet.stopped.append(old)
            new = fleet.start("worker", f"w{i + 1}.2", node_url)
            fleet.workers[i] = new
            new.wait_said("ready")
            wait_for(lambda w=new: bool(w.of("processed")), f"{new.name} to process")
        phases["workers rolled"] = time.monotonic() - began

        # Servers, one by one, each back on its own address; the caller must
        # be getting answers from the new one before the other goes (with
        # both gone at once, a call has nobody to go to).
        for i in range(SERVERS):
            old = fleet.servers[i]
            old.stop()
            assert old.of("stopped"), old.describe()
            fleet.stopped.append(old)
            new = fleet.start_server(f"s{i + 1}.2", fleet.server_urls[i])
            fleet.servers[i] = new
            wait_for(lambda n=new.name: answered_by(n) >= 5, f"the caller to reach {new.name}")
        phases["servers rolled"] = time.monotonic() - began

        # What the node counted for the queue while workers and servers rolled.
        rolled = json.loads(cli("queues", node_url, "--json").strip().splitlines()[-1])
        phases["node counters read"] = time.monotonic() - began

        # The node: SIGTERM, then the same address and store.
        assert fleet.node is not None
        assert "stopped" in fleet.node.stop()
        last_before = max(number(e["id"]) for e in producer.of("sent"))
        node = fleet.start_node(node_url)
        assert node.url == node_url, node.banner
        wait_for(
            lambda: any(number(e["id"]) > last_before for e in fleet.processed()),
            "a message sent after the node restart to be processed",
        )
        phases["node restarted"] = time.monotonic() - began
        time.sleep(1.0)  # a little steady traffic after the last restart

        # The end: the producer stops sending and waits for the node's
        # confirms of everything; the caller waits for its last calls.
        producer.stop(timeout=2 * DRAIN_WAIT)
        caller.stop(timeout=2 * WAIT)
        assert producer.of("flushed"), producer.describe()
        confirmed = {e["id"] for e in producer.of("confirmed")}

        def missing() -> set[str]:
            return confirmed - {e["id"] for e in fleet.processed()}

        wait_for(
            lambda: not missing(),
            "every confirmed message to be processed",
            DRAIN_WAIT,
            lambda: f"{len(missing())} missing, e.g. {sorted(missing(), key=number)[:10]}",
        )
        phases["drained"] = time.monotonic() - began
        for proc in fleet.workers + fleet.servers:
            proc.stop()
            fleet.stopped.append(proc)
        assert "stopped" in fleet.node.stop()
        phases["stopped"] = time.monotonic() - began

        report = _report(fleet, producer, caller, confirmed, phases)
        report["queue_before_node_restart"] = {
            k: v for k, v in rolled["queues"][QUEUE].items() if k not in ("received", "delivered")
        }
        print("\n" + json.dumps(report, indent=2))
        _check(fleet, producer, caller, confirmed, report)
    finally:
        fleet.kill_all()


def _report(
    fleet: Fleet,
    producer: Proc,
    caller: Proc,
    confirmed: set[str],
    phases: dict[str, float],
) -> dict[str, Any]:
    processed = fleet.processed()
    runs = Counter(e["id"] for e in processed)
    calls = caller.of("call")
    workers = [p.of("stopped")[0]["stats"] for p in fleet.stopped if p.name.startswith("w")]
    servers = [p.of("stopped")[0]["stats"] for p in fleet.stopped if p.name.startswith("s")]
    return {
        "sent": len(producer.of("sent")),
        "confirmed": len(confirmed),
        "send_failures": len(producer.of("failed")),
        "processed": len(processed),
        "processed_ids": len(runs),
        "duplicates": len(processed) - len(runs),
        "processed_marked_redelivered": sum(1 for e in processed if e["redelivered"]),
        "lost": len(confirmed - set(runs)),
        "calls": len(calls),
        "calls_failed": sum(1 for c in calls if not c["ok"]),
        "request_retries": caller.of("stopped")[0]["request_retries"],
        "slowest_call_s": round(max(c["s"] for c in calls), 3),
        "worker_acked": sum(w["acked"] for w in workers),
        "handed_back": sum(w["handed_back"] for w in workers),
        "abandoned": sum(w["abandoned"] for w in workers),
        "unreturned_at_close": sum(w["unreturned_at_close"] for w in workers),
        "server_handled": sum(s["handled"] for s in servers),
        "calls_run_twice": _run_twice(fleet),  # see the xfail test below
        "server_cut": sum(s["cut"] for s in servers),
        "restored_by_node_restart": _restored(fleet.nodes[1].banner),
        "flush_after_stop_s": round(producer.of("flushed")[0]["seconds"], 3),
        "outbox": producer.of("flushed")[0]["outbox"],
        "seconds": {k: round(v, 1) for k, v in phases.items()},
    }


def _run_twice(fleet: Fleet) -> list[dict[str, Any]]:
    """Calls whose handler ran on more than one server (or twice on one)."""
    runs: dict[str, list[str]] = {}
    for proc in fleet.procs:
        if proc.name.startswith("s"):
            for event in proc.of("served"):
                runs.setdefault(event["call"], []).append(proc.name)
    return [{"call": call, "servers": on} for call, on in runs.items() if len(on) > 1]


def _restored(banner: str) -> int:
    found = re.search(r"\((\d+) messages restored\)", banner)
    assert found, banner
    return int(found.group(1))


def _check(
    fleet: Fleet, producer: Proc, caller: Proc, confirmed: set[str], report: dict[str, Any]
) -> None:
    calls = caller.of("call")
    failed = [c for c in calls if not c["ok"]]
    assert not failed, f"{len(failed)} calls failed, the first: {failed[:5]}"
    # Every call started came back: n runs 0..N-1 with none missing.
    assert sorted(c["n"] for c in calls) == list(range(len(calls)))
    assert not producer.of("failed"), producer.of("failed")[:5]
    sent = {e["id"] for e in producer.of("sent")}
    assert confirmed == sent  # the outbox took every send
    processed = fleet.processed()
    assert {e["id"] for e in processed} <= sent  # nothing from nowhere
    assert report["lost"] == 0
    unmarked = Counter(e["id"] for e in processed if not e["redelivered"])
    twice = {i: n for i, n in unmarked.items() if n > 1}
    assert not twice, (
        f"{len(twice)} messages processed more than once without the redelivered mark, "
        f"e.g. {sorted(twice)[:10]}"
    )
    # Every draining worker handed back what it had not run, and every
    # draining server finished its requests within the grace.
    assert report["unreturned_at_close"] == 0
    assert report["server_cut"] == 0
    # The node heard every stopped worker say goodbye (none was reaped as
    # lost) and got what they handed back at once (no lease ran out).
    queue = report["queue_before_node_restart"]
    assert (queue["consumers_lost"], queue["expired"]) == (0, 0), queue
    # Sanity: the load really ran through the restarts.
    assert report["calls"] > 0 and report["confirmed"] > 0


@pytest.mark.xfail(
    strict=True,
    reason="bug: a caller's link (a DEALER with ZMQ_IMMEDIATE, transports/zmq/link.py) "
    "drops a reply it has received but not yet read when the server's connection closes "
    "(libzmq terminates an immediate socket's pipe on disconnect), so a draining server's "
    "last reply is lost, the call is retried elsewhere and its handler runs twice. A "
    "closing node now keeps its connections open REPLY_GRACE (0.25 s) after its last "
    "reply, which covers a caller that reads within that; this test blocks the caller "
    "until the server has exited, which no grace covers",
)
@pytest.mark.timeout(120)
def test_the_last_reply_of_a_draining_server_reaches_its_caller(tmp_path) -> None:
    """A server finishes a request while it drains, replies, and exits: the
    caller gets that reply, and no other server runs the request again.

    The rolling restart shows this now and then (``calls_run_twice``: a
    reply sent within a millisecond of the server closing); here the
    caller's loop is kept busy from SIGTERM until the server has exited,
    so the reply is always waiting unread when the connection closes.
    """
    logs = tmp_path / "logs"
    logs.mkdir()

    async def scenario() -> None:
        ran_here: list[str] = []

        def answer(message: pigeon.Message) -> str:
            ran_here.append(message.text)
            return "other"

        async with pigeon.connect(bind=ANY_PORT, heartbeat=HEARTBEAT) as other:
            draining = Proc(logs, "server", "draining", ANY_PORT, "--work=0.5")
            try:
                ready = await asyncio.to_thread(draining.wait_said, "ready")
                async with pigeon.connect(
                    [ready["url"], bound(other)], heartbeat=HEARTBEAT
                ) as client:
                    # Only the draining server serves svc yet: the call goes there.
                    call = asyncio.ensure_future(client.request(SERVICE, "x", timeout=WAIT))
                    await asyncio.to_thread(draining.wait_said, "served")
                    await other.serve(SERVICE, answer)
                    await other.serve("probe", lambda m: "here")  # after svc: see below
                    # A client that reaches probe has heard that other serves svc.
                    await wait_until_answered(client, "probe")
                    draining.popen.send_signal(signal.SIGTERM)
                    # Blocking on purpose: this process reads nothing until the
                    # server has finished the request, replied and exited.
                    assert draining.popen.wait(WAIT) == 0, draining.describe()
                    reply = await call
                    assert (reply.text, ran_here) == ("draining", [])
            finally:
                draining.kill()

    asyncio.run(asyncio.wait_for(scenario(), 100))
