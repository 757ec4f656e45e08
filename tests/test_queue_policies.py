"""Per-queue policy on a real node: from its queue file, and declared by an
admin peer; every bound refuses with a typed error and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import pigeon

WAIT = 30.0

QUEUES = """
[queue."orders"]
max_attempts = 2
max_length = 3

[queue."big.>"]
max_bytes = 1000
max_prefetch = 2
"""


def test_a_node_applies_its_queue_file(tmp_path: Path) -> None:
    (tmp_path / "queues.toml").write_text(QUEUES)

    async def main() -> None:
        async with pigeon.connect(
            bind="tcp://127.0.0.1:0", queues=tmp_path / "queues.toml"
        ) as node:
            url = node.stats()["bound"][0]
            async with pigeon.connect(url) as client:
                # max_length on "orders" only
                for _ in range(3):
                    await client.send("orders", b"o", timeout=WAIT)
                with pytest.raises(pigeon.Backpressure):
                    await client.send_nowait("orders", b"o")
                for _ in range(5):
                    await client.send("other", b"x", timeout=WAIT)
                # max_bytes on every queue under "big": the message that
                # crosses the line is taken, the next is refused
                await client.send("big.one", b"b" * 600, timeout=WAIT)
                await client.send("big.one", b"b" * 600, timeout=WAIT)
                with pytest.raises(pigeon.Backpressure):
                    await client.send_nowait("big.one", b"b" * 600)
                assert node.stats()["queues"]["big.one"]["ready"] == 2

                # max_attempts: the host's limit, whatever the worker's policy
                failed = asyncio.Event()

                def fail(delivery: pigeon.Delivery) -> None:
                    if delivery.message.attempt >= 2:
                        failed.set()
                    raise RuntimeError("no")

                retry = pigeon.RetryPolicy(max_attempts=10, base_delay=0.01, jitter=0.0)
                await client.consume("orders", fail, retry=retry)
                await asyncio.wait_for(failed.wait(), WAIT)
                while node.stats()["queues"].get("orders.dead", {}).get("ready", 0) < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)

                # max_prefetch: asked 100, granted 2
                await client.consume("big.one", lambda d: None, prefetch=100)
                granted = client.stats()["granted"]
                assert [g["prefetch"] for k, g in granted.items() if k.startswith("big.one@")] == [
                    2
                ]
                assert node.stats()["queue_policies"]["orders"] == {
                    "max_attempts": 2,
                    "max_length": 3,
                }

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_admin_peer_declares_a_queue_policy(tmp_path: Path) -> None:
    async def main() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as node:
            url = node.stats()["bound"][0]
            async with pigeon.connect(url) as admin:
                await admin.send("jobs", b"1", timeout=WAIT)
                answer = await admin.request(
                    "pigeon.declare", {"queue": "jobs", "policy": {"max_length": 1}}, timeout=WAIT
                )
                assert answer.decode()["policy"]["max_length"] == 1
                with pytest.raises(pigeon.Backpressure):
                    await admin.send_nowait("jobs", b"2")
                with pytest.raises(pigeon.Rejected, match="max_length must be an int"):
                    await admin.request(
                        "pigeon.declare",
                        {"queue": "jobs", "policy": {"max_length": -5}},
                        timeout=WAIT,
                    )
                # The bad declaration changed nothing; a new one lifts the bound.
                await admin.request("pigeon.declare", {"queue": "jobs", "policy": {}}, timeout=WAIT)
                await admin.send("jobs", b"2", timeout=WAIT)
                assert node.stats()["queues"]["jobs"]["ready"] == 2

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[queue."jobs"]\nmax_length = -1\n', "max_length must be an int"),
        ('[queues."jobs"]\nmax_length = 1\n', "unknown table 'queues'"),
        ('[queue."jobs"]\ncolour = "red"\n', "unknown policy field 'colour'"),
        ("[queue\n", "not valid TOML"),
    ],
)
def test_a_bad_queue_file_stops_the_node_with_the_reason(
    tmp_path: Path, text: str, error: str
) -> None:
    path = tmp_path / "queues.toml"
    path.write_text(text)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pigeon.cli.main",
            "node",
            "--bind",
            "tcp://127.0.0.1:0",
            "--queues",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert error in done.stderr and str(path) in done.stderr
