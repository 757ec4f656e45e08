"""pigeon.logs: JSON lines, and one DEBUG line per lifecycle event."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

import pigeon
from pigeon import logs
from pigeon.testing.conformance import wait_until


def test_json_logs_are_one_object_per_line_with_extra_fields() -> None:
    stream = io.StringIO()
    handler = logs.configure(level="DEBUG", fmt="json", stream=stream)
    try:
        log = logging.getLogger("pigeon.test")
        log.debug("consumer started: %s", "jobs", extra={"queue": "jobs"})
        log.warning("handler error")
        logging.getLogger("other").warning("not ours")
    finally:
        logging.getLogger("pigeon").removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["consumer started: jobs", "handler error"]
    assert lines[0]["level"] == "DEBUG" and lines[0]["logger"] == "pigeon.test"
    assert lines[0]["queue"] == "jobs" and isinstance(lines[0]["ts"], float)


def test_logs_refuse_an_unknown_level_or_format() -> None:
    with pytest.raises(ValueError, match="format"):
        logs.configure(fmt="xml")
    with pytest.raises(ValueError, match="level"):
        logs.configure(level="LOUD")


def test_lifecycle_events_are_logged_at_debug_and_errors_at_warning() -> None:
    stream = io.StringIO()
    handler = logs.configure(level="DEBUG", fmt="json", stream=stream)

    async def main() -> None:
        async with pigeon.connect("memory://logs") as conn:
            done = asyncio.Event()

            async def fail(delivery: pigeon.Delivery) -> None:
                done.set()
                raise ValueError("no")

            await conn.consume("logs-jobs", fail, retry=pigeon.RetryPolicy(max_attempts=1))
            await conn.serve("logs-svc", lambda message: "ok")
            await conn.send("logs-jobs", "x")
            await asyncio.wait_for(done.wait(), 30.0)

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("pigeon").removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    debug = [line["message"] for line in lines if line["level"] == "DEBUG"]
    warning = [line["message"] for line in lines if line["level"] == "WARNING"]
    for event in (
        "connected: memory://logs",
        "consumer started: logs-jobs",
        "server started: logs-svc",
        "consumer draining: logs-jobs",
        "server stopped: logs-svc",
        "closed: memory://logs",
    ):
        assert any(message.startswith(event) for message in debug), (event, debug)
    assert any(message.startswith("handler error on logs-jobs") for message in warning)
    assert any(message.startswith("dead letter from logs-jobs") for message in warning)


def test_a_link_going_up_and_down_is_logged_at_debug() -> None:
    stream = io.StringIO()
    handler = logs.configure(level="DEBUG", fmt="json", stream=stream)

    def messages() -> list[str]:
        return [json.loads(line)["message"] for line in stream.getvalue().splitlines()]

    async def main() -> None:
        node = await pigeon.connect(bind="tcp://127.0.0.1:0", heartbeat=0.2)
        address = node.stats()["bound"][0]
        async with pigeon.connect(address, heartbeat=0.2) as client:
            await client.send("logs-link", "x")  # confirmed: the link is up
            assert f"link up: {address}" in messages()
            await node.close()
            await wait_until(
                lambda: any(m.startswith(f"link down: {address}") for m in messages()),
                30.0,
                "the link down line",
            )

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("pigeon").removeHandler(handler)
