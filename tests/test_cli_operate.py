"""``pigeon queues``, ``dead``, ``replay``, ``purge``, ``top``, ``ping`` and
``info`` as a user runs them, on a brokerless node (a ``pigeon node``
process), on NATS and on RabbitMQ, with traffic made by the test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from brokers import AMQP_URL, NATS_URL, completed, free_port, require

import pigeon
import pigeon.sync
from pigeon.transports.amqp import inventory as amqp_inventory

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
WAIT = 30.0  # a bound for what takes well under a second on a quiet machine


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PIGEON, *args],
        capture_output=True,
        text=True,
        timeout=4 * WAIT,
        input=input,
        env={**os.environ, "COLUMNS": "200"},
    )


def ok(*args: str) -> str:
    done = run(*args)
    assert done.returncode == 0, completed(done)
    assert "Traceback" not in done.stderr, completed(done)
    return done.stdout


def as_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json", "--timeout", str(WAIT)))


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fails(delivery: pigeon.sync.Delivery) -> None:
    raise ValueError("no stock")


@contextlib.contextmanager
def traffic(url: str, jobs: str, bad: str) -> Iterator[pigeon.sync.Connection]:
    """Four ready messages in ``jobs``; two dead letters of ``bad``."""
    with pigeon.sync.connect(url) as client:
        for n in range(4):
            client.send(jobs, {"n": n})
        worker = client.consume(bad, fails, retry=pigeon.RetryPolicy(max_attempts=1))
        for n in range(2):
            client.send(bad, {"n": n})
        wait_for(lambda: worker.stats()["dead_lettered"] >= 2, "two dead letters")
        worker.close()
        yield client


def check_operating_commands(url: str, jobs: str, bad: str) -> None:
    """What every transport answers the same way."""
    overview = as_json("queues", url)
    assert overview["transport"] in ("zmq", "nats", "amqp")
    assert overview["queues"][jobs]["ready"] == 4
    wait_for(lambda: as_json("queues", url)["queues"][bad]["dead"] == 2, "dead counted")

    table = ok("queues", url)
    assert re.search(rf"^{re.escape(jobs)}\s+4\s", table, re.M), table
    assert "ready" in table.splitlines()[0] and "dead" in table.splitlines()[0]

    letters = as_json("dead", url, bad, "--limit", "5")
    assert sorted(letter["body"] for letter in letters) == ['{"n":0}', '{"n":1}']
    assert all("no stock" in letter["reason"] for letter in letters)
    shown = ok("dead", url, bad)
    assert "2 dead letter(s) shown" in shown and "no stock" in shown

    assert as_json("replay", url, bad, "--limit", "1") == {"queue": bad, "replayed": 1}
    assert f"replayed 1 dead letter(s) into {bad!r}" in ok("replay", url, bad)
    wait_for(lambda: as_json("queues", url)["queues"][bad]["ready"] == 2, "replayed ready")

    assert as_json("purge", url, bad, "--yes") == {"queue": bad, "dead": False, "purged": 2}
    assert as_json("purge", url, jobs, "--yes", "--dead") == {
        "queue": jobs,
        "dead": True,
        "purged": 0,
    }
    assert "purged 4 message(s)" in ok("purge", url, jobs, "--yes")
    after = as_json("queues", url)["queues"]
    # (On NATS an empty queue nobody consumes is no subject at all: not listed.)
    assert after.get(jobs, {"ready": 0})["ready"] == 0 and after[bad]["ready"] == 0

    pings = ok("ping", url, "--count", "2", "--interval", "0.1").splitlines()
    assert len(pings) == 2 and all(f"answer from {url}" in line for line in pings)
    assert "ms" in as_json("ping", url)

    info = as_json("info", url)
    assert {"transport", "address", "node", "version", "services", "peers"} <= set(info)
    assert "transport" in ok("info", url)

    snapshots = [
        json.loads(line)
        for line in ok("top", url, "--json", "--count", "2", "--interval", "0.2").splitlines()
    ]
    assert len(snapshots) == 2 and bad in snapshots[1]["queues"]
    assert set(snapshots[1]["rates"][bad]) == {"received_per_s", "acked_per_s"}
    view = ok("top", url, "--count", "1")
    assert "queues at" in view and "services" in view and bad in view


# -- a brokerless node ---------------------------------------------------------


class NodeProcess:
    def __init__(self) -> None:
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [*PIGEON, "node", "--bind", self.url, "--max-attempts", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            assert selector.select(WAIT), "the node printed no banner"
        banner = self.proc.stdout.readline()
        assert "serving" in banner, banner

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=WAIT)


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    node = NodeProcess()
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.timeout(600)
def test_every_command_on_a_node(node: NodeProcess) -> None:
    url = node.url
    with traffic(url, "jobs", "bad"):
        check_operating_commands(url, "jobs", "bad")


@pytest.mark.timeout(300)
def test_services_show_calls_errors_and_latency_on_a_node(node: NodeProcess) -> None:
    with pigeon.sync.connect(node.url) as server, pigeon.sync.connect(node.url) as caller:

        def echo(message: pigeon.Message) -> object:
            if message.decode() == "boom":
                raise ValueError("boom")
            return message.decode()

        server.serve("echo", echo)
        wait_for(
            lambda: (
                "echo" in as_json("info", node.url)["services"]
                or any("echo" in p["services"] for p in as_json("info", node.url)["peers"])
            ),
            "echo offered through the node",
        )
        for _ in range(3):
            caller.request("echo", "hi", timeout=WAIT)
        with pytest.raises(pigeon.Rejected):
            caller.request("echo", "boom", timeout=WAIT)
        snapshot = json.loads(ok("top", node.url, "--json", "--count", "1").splitlines()[0])
        echo_row = snapshot["services"]["echo"]
        assert echo_row["servers"] == 1 and echo_row["calls"] == 4 and echo_row["errors"] == 1
        assert echo_row["p50_ms"] > 0 and echo_row["p99_ms"] >= echo_row["p50_ms"]
        assert re.search(r"^echo\s+1\s+4\s+1\s", ok("top", node.url, "--count", "1"), re.M)


@pytest.mark.timeout(300)
def test_watch_prints_a_json_line_per_interval_with_rates(node: NodeProcess) -> None:
    with pigeon.sync.connect(node.url) as client:
        client.send("jobs", {"n": 0})
        watcher = subprocess.Popen(
            [*PIGEON, "queues", node.url, "--watch", "--json", "--interval", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())
            for n in range(1, 6):
                client.send("jobs", {"n": n})
            later = first
            deadline = time.monotonic() + WAIT
            while later["queues"]["jobs"]["received"] < 6:
                assert time.monotonic() < deadline, "the watch never saw the sends"
                later = json.loads(watcher.stdout.readline())
        finally:
            watcher.send_signal(signal.SIGINT)  # Ctrl-C ends it quietly
            _, err = watcher.communicate(timeout=WAIT)
    assert first["queues"]["jobs"]["received"] == 1
    assert first["rates"]["jobs"] == {"received_per_s": None, "acked_per_s": None}
    assert later["rates"]["jobs"]["received_per_s"] > 0
    assert watcher.returncode == 0 and "Traceback" not in err, err


def test_nothing_reachable_exits_69_at_once() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    for command in (
        ["ping", url],
        ["info", url],
        ["top", url, "--count", "1"],
        ["purge", url, "jobs", "--yes"],
        ["queues", url, "--watch"],
    ):
        started = time.monotonic()
        done = run(*command, "--timeout", str(WAIT))
        assert done.returncode == 69, completed(done)
        assert f"Nothing reachable at {url}" in done.stderr, completed(done)
        # Refused: said well before the timeout (a bound, not a speed check).
        assert time.monotonic() - started < WAIT, completed(done)


def test_purge_asks_first_on_a_terminal_only_and_a_no_keeps_the_messages(
    node: NodeProcess,
) -> None:
    import pty

    with pigeon.sync.connect(node.url) as client:
        client.send("keep", {"n": 1})
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*PIGEON, "purge", node.url, "keep"],
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(primary, b"n\n")
        out, err = proc.communicate(timeout=WAIT)
    finally:
        os.close(primary)
        os.close(secondary)
    assert "Remove the ready messages of 'keep'" in out + err
    assert proc.returncode != 0  # aborted
    assert as_json("queues", node.url)["queues"]["keep"]["ready"] == 1


def test_top_quits_on_q_from_a_terminal(node: NodeProcess) -> None:
    import pty

    primary, secondary = pty.openpty()
    try:
        top = subprocess.Popen(
            [*PIGEON, "top", node.url, "--interval", "0.5"],
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert top.stdout is not None
        assert "queues at" in top.stdout.readline()  # it is showing
        os.write(primary, b"q")
        out, err = top.communicate(timeout=WAIT)
    finally:
        os.close(primary)
        os.close(secondary)
    assert top.returncode == 0 and "Traceback" not in err, err


def test_a_key_without_the_admin_grant_is_refused_and_exits_1(tmp_path: Path) -> None:
    for name in ("node", "ops", "worker"):
        ok("keys", "new", str(tmp_path / name))
    acl = tmp_path / "acl.toml"
    acl.write_text(
        '[clients.ops]\nkey = "ops.key"\nadmin = true\n\n'
        '[clients.worker]\nkey = "worker.key"\nconsume = ["jobs"]\n'
    )
    url = f"tcp://127.0.0.1:{free_port()}"
    node = subprocess.Popen(
        [*PIGEON, "node", "--bind", url, "--key", str(tmp_path / "node.key_secret")]
        + ["--allow", str(acl)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert node.stdout is not None and "serving" in node.stdout.readline()
        server_key = ["--server-key", str(tmp_path / "node.key")]
        as_ops = ["--key", str(tmp_path / "ops.key_secret"), *server_key]
        as_worker = ["--key", str(tmp_path / "worker.key_secret"), *server_key]
        assert as_json("queues", url, *as_ops)["secure"] is True
        for command in (["queues", url], ["purge", url, "jobs", "--yes"], ["dead", url, "jobs"]):
            done = run(*command, *as_worker, "--timeout", str(WAIT))
            assert done.returncode == 1, completed(done)
            assert "Forbidden" in done.stderr and "Traceback" not in done.stderr
    finally:
        node.send_signal(signal.SIGTERM)
        node.communicate(timeout=WAIT)


# -- brokers --------------------------------------------------------------------


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"admin_jobs_{tag}", f"admin_bad_{tag}"


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_every_command_on_nats() -> None:
    url = require(NATS_URL)
    jobs, bad = _names()
    with traffic(url, jobs, bad):
        check_operating_commands(url, jobs, bad)
    assert as_json("info", url)["version"]


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_every_command_on_rabbitmq() -> None:
    url = require(AMQP_URL)
    jobs, bad = _names()
    with traffic(url, jobs, bad):
        check_operating_commands(url, jobs, bad)
        # A queue pigeon did not declare is shown when named.
        listed = as_json("queues", url, "--queue", "admin_never_declared")["queues"]
        assert "admin_never_declared" not in listed  # no such queue: not made up
    assert "RabbitMQ" in as_json("info", url)["version"]


@pytest.mark.broker
def test_brokers_that_do_not_answer_exit_69() -> None:
    for url in (f"nats://127.0.0.1:{free_port()}", f"amqp://guest:guest@127.0.0.1:{free_port()}/"):
        done = run("ping", url, "--timeout", "5")
        assert done.returncode == 69, completed(done)
        assert "Nothing reachable at" in done.stderr and "Traceback" not in done.stderr


def test_memory_is_this_process_broker_and_the_help_says_so() -> None:
    overview = as_json("queues", "memory://elsewhere")
    assert overview["transport"] == "memory" and overview["queues"] == {}
    assert "empty broker of its own" in " ".join(ok("queues", "--help").split())
    done = run("ping", "inproc://elsewhere")
    assert done.returncode == 69 and "reached only from its own process" in done.stderr


@pytest.mark.broker
def test_an_inventory_entry_that_is_no_queue_name_is_skipped_and_counted() -> None:
    """Any AMQP client may write the inventory stream: what is not a queue
    name is never declared or listed, only counted."""
    url = require(AMQP_URL)
    junk = "not a name * > " + uuid.uuid4().hex

    async def write_junk() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(
                amqp_inventory.QUEUE, durable=True, arguments=amqp_inventory.ARGUMENTS
            )
            await channel.default_exchange.publish(
                aio_pika.Message(junk.encode()), routing_key=amqp_inventory.QUEUE
            )

    asyncio.run(write_junk())
    listed = as_json("queues", url)
    assert junk not in listed["queues"]
    assert listed["inventory_skipped"] >= 1, listed
