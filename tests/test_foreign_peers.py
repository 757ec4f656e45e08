"""Foreign peers: plain ZeroMQ sockets meet pigeon nodes in every direction,
and each meeting ends in an answer, an error or a count within 2 s, never a
hang (docs/protocol.md, "Strangers" and "Foreign peers")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine

import pytest
import zmq
import zmq.asyncio

import pigeon
from pigeon._core import frames

pytestmark = pytest.mark.timeout(30)

SOON = 2.0  # the bound: an error or a count within this


async def _until(check: Callable[[], bool], within: float = SOON) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "no error nor count within the bound"
        await asyncio.sleep(0.01)


def _run(scenario: Coroutine[None, None, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 25))


def _raw(kind: int) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def test_a_raw_req_gets_an_answer_it_can_read() -> None:
    async def scenario() -> None:
        # A REQ sends [empty, body]: it is answered [empty, text], so it does
        # not wait forever, and it is counted once and named.
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as node:
            req = _raw(zmq.REQ)
            req.connect(node.stats()["bound"][0])
            try:
                for _ in range(2):  # a REQ alternates send and recv
                    await req.send(b"hello?")
                    answer = await asyncio.wait_for(req.recv(), SOON)
                    assert b"pigeon node" in answer and b"docs/protocol.md" in answer
                stats = node.stats()
                assert stats["foreign_peers"] == 1  # once per peer, not per message
                assert "REQ framing" in stats["last_foreign_peer"]
                assert "127.0.0.1" in stats["last_foreign_peer"]
            finally:
                req.close()

    _run(scenario())


def test_a_raw_push_to_a_node_is_counted() -> None:
    async def scenario() -> None:
        # libzmq refuses PUSH <-> ROUTER at the handshake: nothing can answer
        # the PUSH, but the node counts it.
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as node:
            push = _raw(zmq.PUSH)
            push.connect(node.stats()["bound"][0])
            try:
                await _until(lambda: node.stats()["foreign_peers"] >= 1)
                assert "handshake" in node.stats()["last_foreign_peer"]
            finally:
                push.close()

    _run(scenario())


def test_a_raw_dealer_sending_garbage_is_told_and_counted() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as node:
            dealer = _raw(zmq.DEALER)
            dealer.connect(node.stats()["bound"][0])
            try:
                await dealer.send(b"GET / HTTP/1.0\r\n\r\n")
                answer = frames.decode(await asyncio.wait_for(dealer.recv(), SOON))
                assert isinstance(answer, frames.Error)
                assert "pigeon node" in answer.reason
                await dealer.send(b"more garbage")
                await asyncio.wait_for(dealer.recv(), SOON)
                stats = node.stats()
                assert stats["foreign_peers"] == 1
                assert stats["protocol_errors"] == 2
                assert "not a pigeon frame" in stats["last_foreign_peer"]
            finally:
                dealer.close()

    _run(scenario())


def test_a_client_calling_a_raw_rep_is_told_there_is_no_pigeon_node() -> None:
    async def scenario() -> None:
        rep = _raw(zmq.REP)
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        try:
            # A node bears a peer's silence for heartbeat x misses after the
            # ZeroMQ handshake (a slow link's Hello comes late): 0.9 s here.
            async with pigeon.connect(address, heartbeat=0.3) as client:
                started = time.monotonic()
                with pytest.raises(pigeon.NoPigeonNode) as caught:
                    await client.request("upper", b"hi", timeout=10.0)
                assert time.monotonic() - started < SOON
                assert isinstance(caught.value, pigeon.TransportError)
                assert f"no pigeon node at {address}" in str(caught.value)
                assert "did not answer Hello" in str(caught.value)
                assert caught.value.address == address
                assert client.stats()["foreign_peers"] == 1
        finally:
            rep.close()

    _run(scenario())


def test_a_worker_on_a_raw_push_fountain_is_counted_and_calls_fail() -> None:
    async def scenario() -> None:
        # The seed's fountain binds a PUSH; libzmq refuses PUSH <-> DEALER.
        fountain = _raw(zmq.PUSH)
        port = fountain.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        try:
            async with pigeon.connect(address) as worker:
                await worker.consume("words", lambda delivery: None)
                await _until(lambda: worker.stats()["foreign_peers"] == 1)
                assert "handshake" in worker.stats()["last_foreign_peer"]
                assert address in worker.stats()["last_foreign_peer"]
                with pytest.raises(pigeon.NoPigeonNode, match="refused the pigeon handshake"):
                    await worker.request("anything", b"", timeout=5.0)
        finally:
            fountain.close()

    _run(scenario())
