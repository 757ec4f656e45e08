"""``pigeon node``, ``queues``, ``dead`` and ``replay`` as a user runs them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

import pigeon
import pigeon.sync

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]


def free_tcp() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class Node:
    def __init__(self, url: str, store: str) -> None:
        self.proc = subprocess.Popen(
            [*PIGEON, "node", "--bind", url, "--store", store, "--heartbeat", "0.2"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline()
        assert "pigeon node: serving" in self.banner

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0
        return out


def cli(*args: str) -> str:
    done = subprocess.run([*PIGEON, *args], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(60)
def test_node_keeps_dead_letters_across_restarts_and_replays_them(tmp_path) -> None:
    url, store = free_tcp(), str(tmp_path / "node.db")
    node = Node(url, store)
    try:
        with pigeon.sync.connect(url, heartbeat=0.2) as client:
            for n in range(3):
                client.send("orders", {"n": n})

            def always_fails(delivery: pigeon.sync.Delivery) -> None:
                raise ValueError("no stock")

            policy = pigeon.RetryPolicy(max_attempts=2, base_delay=0.01)
            worker = client.consume("orders", always_fails, retry=policy)
            deadline = time.monotonic() + 10
            while worker.stats()["dead_lettered"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.close()
        assert "stopped" in node.stop()
        node = Node(url, store)  # a new process, the same store
        assert "(3 messages restored)" in node.banner
        letters = json.loads(cli("dead", url, "orders", "--json").strip().splitlines()[-1])
        assert sorted(json.loads(letter["body"])["n"] for letter in letters) == [0, 1, 2]
        assert all("no stock" in letter["reason"] for letter in letters)
        assert "replayed 3" in cli("replay", url, "orders")
        info = json.loads(cli("queues", url, "--json").strip().splitlines()[-1])
        assert info["queues"]["orders"]["ready"] == 3
        assert info["queues"]["orders.dead"]["ready"] == 0
        got: list[int] = []
        with pigeon.sync.connect(url, heartbeat=0.2) as client:
            client.consume("orders", lambda d: got.append(d.decode()["n"]))
            deadline = time.monotonic() + 10
            while len(got) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert sorted(got) == [0, 1, 2]
        table = cli("queues", url)
        assert "orders" in table and "ready" in table
    finally:
        if node.proc.poll() is None:
            node.stop()
