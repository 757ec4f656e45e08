"""pigeon's types reach user code: the package ships py.typed, the App
decorators keep the handler's type, Message.decode(T) is a T, and the sync
twin returns its own types. Checked by running mypy on a snippet (a couple of
seconds); skipped when mypy is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pigeon

SNIPPET = """
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any, assert_type

import pigeon
import pigeon.sync


@dataclasses.dataclass
class Order:
    sku: str
    quantity: int


app = pigeon.App("memory://typing")


@app.worker("orders")
async def take(order: Order) -> None: ...


@app.service("double")
def double(n: int) -> int:
    return n * 2


@app.worker("manual")
def by_hand(delivery: pigeon.sync.Delivery) -> None:
    delivery.reject("no")


assert_type(double(21), int)
kept: Callable[[pigeon.sync.Delivery], None] = by_hand
by_hand(1)  # type: ignore[arg-type]
double("x")  # type: ignore[arg-type]
take(1).close()  # type: ignore[arg-type]


async def use(conn: pigeon.Connection, message: pigeon.Message) -> None:
    assert_type(message.decode(Order), Order)
    assert_type(message.decode(), Any)
    assert_type(await conn.request("double", 2), pigeon.Message)
    assert_type(conn.send_nowait("q", b"x"), asyncio.Future[None])
    assert_type(await conn.consume("q", lambda d: None), pigeon.Worker)


def use_sync(conn: pigeon.sync.Connection, delivery: pigeon.sync.Delivery) -> None:
    assert_type(conn.send_many("q", [b"x"]), concurrent.futures.Future[None])
    assert_type(conn.consume("q", lambda d: d.ack()), pigeon.sync.Worker)
    assert_type(delivery.decode(Order), Order)
    assert_type(delivery.ack(), None)


@app.subscriber("prices.>", last=1)
def on_price(event: pigeon.sync.Event) -> None: ...


def use_sync_pubsub(conn: pigeon.sync.Connection) -> None:
    kept_price: Callable[[pigeon.sync.Event], None] = on_price
    on_price(1)  # type: ignore[arg-type]
    assert_type(conn.publish_nowait("a.b", 1), concurrent.futures.Future[None])
    assert_type(conn.subscribe("a.>", lambda e: e.ack()), pigeon.sync.Subscriber)
    with conn.subscription("a.>", last=1) as events:
        for event in events:
            assert_type(event, pigeon.sync.Event)
            assert_type(event.topic, str)
    assert_type(conn.request_all("s", 1), list[pigeon.Message])
"""


def test_py_typed_is_in_the_package() -> None:
    assert (Path(pigeon.__file__).parent / "py.typed").is_file()


@pytest.mark.timeout(120)
def test_user_code_type_checks(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            str(snippet),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
