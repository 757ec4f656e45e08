"""A send the caller saw time out is reported once: not waited for again at
close, not failed again, and no future's exception is left unretrieved."""

from __future__ import annotations

import asyncio
import gc
import socket
import time

import pytest

import pigeon


def _unused_port() -> int:
    # Nobody listens here for the test's short life: the node is unreachable.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_timed_out_send_is_not_reported_again_at_close() -> None:
    unretrieved: list[object] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
        conn = await pigeon.connect(f"tcp://127.0.0.1:{_unused_port()}")
        try:
            await conn.send("q", "never confirmed", timeout=0.2)
        except pigeon.Timeout:
            pass
        else:
            raise AssertionError("a send to nobody was confirmed")
        started = time.monotonic()
        await conn.close(timeout=30.0)
        closing = time.monotonic() - started
        stats = conn.stats()
        assert stats["withdrawn"] == 1
        assert stats["unconfirmed_at_close"] == 0
        # Nothing is left to wait for: close does not spend its timeout again.
        assert closing < 10.0, closing
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    gc.collect()
    assert not unretrieved, unretrieved


def test_a_local_durable_send_is_answered_even_when_storing_breaks(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    async def main() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", store=tmp_path / "q.db") as node:
            host = node.transport.sender.host  # type: ignore[attr-defined]

            async def broken(queue: str, messages: list) -> list:
                raise RuntimeError("a bug in the store path")

            monkeypatch.setattr(host, "put_many", broken)
            with pytest.raises(RuntimeError, match="a bug"):
                await asyncio.wait_for(node.send_nowait("q", b"x"), 10)
            assert node.stats()["unconfirmed"] == 0  # nothing left waiting for it

    asyncio.run(main())
