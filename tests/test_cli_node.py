"""``pigeon node``, ``queues``, ``dead`` and ``replay`` as a user runs them."""

from __future__ import annotations

import json
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import ANY_PORT, completed, describe, port_taken

import pigeon
import pigeon.sync

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
WAIT = 30.0  # bound for what takes well under a second on a quiet machine


class Node:
    """``pigeon node --store``; ``url`` may be ``tcp://127.0.0.1:0`` (any port)."""

    def __init__(self, url: str, store: str, logs: Path) -> None:
        self.err = logs / f"node-{time.monotonic_ns()}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*PIGEON, "node", "--bind", url, "--store", store, "--heartbeat", "0.5"],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.banner = self._first_line(WAIT)
        served = re.search(r"serving (tcp://\S+?);", self.banner)
        self.url = served.group(1) if served else ""

    def _first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"no banner within {timeout} s\n{self.describe()}")
        return self.proc.stdout.readline()

    @property
    def started(self) -> bool:
        return "pigeon node: serving" in self.banner

    def describe(self, stdout: str = "") -> str:
        return describe("pigeon node", self.proc.poll(), self.err, self.banner + stdout)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=WAIT)
        assert self.proc.returncode == 0, self.describe(out)
        return out


def start_node(url: str, store: str, logs: Path) -> Node:
    """Start a node; on the same port as a node just stopped, retry while the
    port is refused (someone may hold it for a moment)."""
    deadline = time.monotonic() + WAIT
    while True:
        node = Node(url, store, logs)
        if node.started:
            return node
        node.proc.wait(WAIT)
        failure = node.describe()
        if not port_taken(failure) or time.monotonic() >= deadline:
            raise AssertionError(f"the node did not start\n{failure}")
        time.sleep(0.2)


def cli(*args: str) -> str:
    done = subprocess.run(
        [*PIGEON, *args, "--timeout", str(WAIT)], capture_output=True, text=True, timeout=2 * WAIT
    )
    assert done.returncode == 0, completed(done)
    return done.stdout


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {WAIT} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_node_keeps_dead_letters_across_restarts_and_replays_them(tmp_path) -> None:
    store = str(tmp_path / "node.db")
    node = start_node(ANY_PORT, store, tmp_path)
    url = node.url
    try:
        with pigeon.sync.connect(url, heartbeat=0.5) as client:
            for n in range(3):
                client.send("orders", {"n": n})

            def always_fails(delivery: pigeon.sync.Delivery) -> None:
                raise ValueError("no stock")

            policy = pigeon.RetryPolicy(max_attempts=2, base_delay=0.01)
            worker = client.consume("orders", always_fails, retry=policy)
            wait_for(lambda: worker.stats()["dead_lettered"] >= 3, "three dead letters")
            worker.close()
        assert "stopped" in node.stop()
        node = start_node(url, store, tmp_path)  # a new process, the same store
        assert "(3 messages restored)" in node.banner
        letters = json.loads(cli("dead", url, "orders", "--json").strip().splitlines()[-1])
        assert sorted(json.loads(letter["body"])["n"] for letter in letters) == [0, 1, 2]
        assert all("no stock" in letter["reason"] for letter in letters)
        assert "replayed 3" in cli("replay", url, "orders")
        info = json.loads(cli("queues", url, "--json").strip().splitlines()[-1])
        assert info["queues"]["orders"]["ready"] == 3
        assert info["queues"]["orders.dead"]["ready"] == 0
        got: list[int] = []
        with pigeon.sync.connect(url, heartbeat=0.5) as client:
            client.consume("orders", lambda d: got.append(d.decode()["n"]))
            wait_for(lambda: len(got) >= 3, "three deliveries")
        assert sorted(got) == [0, 1, 2]
        table = cli("queues", url)
        assert "orders" in table and "ready" in table
    finally:
        if node.proc.poll() is None:
            node.stop()


# -- exit codes, and what the commands say when nothing answers ---------------


def _run(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PIGEON, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=2 * WAIT
    )


def test_nothing_reachable_is_said_in_those_words_and_exits_69() -> None:
    from brokers import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    for command in (["queues", address], ["dead", address, "jobs"], ["replay", address, "jobs"]):
        done = _run(*command, "--timeout", "1")
        assert done.returncode == 69, completed(done)
        assert f"Nothing reachable at {address}" in done.stderr, completed(done)
        assert "Traceback" not in done.stderr


def test_a_url_no_backend_speaks_is_a_usage_error_that_says_why() -> None:
    done = _run("queues", "http://127.0.0.1:4222", "--timeout", "1")
    assert done.returncode == 2, completed(done)
    assert "no admin backend for http://" in done.stderr
    assert "connect_grace" not in done.stderr  # no option leaks into the message


def test_a_closed_pipe_ends_quietly_and_replay_speaks_json(tmp_path: Path) -> None:
    node = start_node(ANY_PORT, str(tmp_path / "node.db"), tmp_path)
    try:
        reader = subprocess.Popen(
            [*PIGEON, "queues", node.url, "--json", "--timeout", str(WAIT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert reader.stdout is not None and reader.stderr is not None
        reader.stdout.close()  # as `| head` does once it has read enough
        err = reader.stderr.read().decode()
        reader.stderr.close()
        assert reader.wait(2 * WAIT) == 0 and "Traceback" not in err, err
        replayed = json.loads(cli("replay", node.url, "jobs", "--json"))
        assert replayed == {"queue": "jobs", "replayed": 0}
    finally:
        node.stop()
