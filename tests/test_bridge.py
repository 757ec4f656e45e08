"""The bridges to plain ZeroMQ peers, each kind against raw pyzmq sockets."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import zmq
import zmq.asyncio
from brokers import free_tcp
from seedmix import PIGEON

import pigeon
from pigeon._core.bridging import Kind, LazyPirate, Malformed, parse_spec, plain_body
from pigeon.bridge import ERROR_PREFIX, open_bridge


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 90))


async def until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def raw(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


# -- specs -----------------------------------------------------------------


def test_specs_defaults_and_prefixes() -> None:
    pull = parse_spec(Kind.PULL, "tcp://127.0.0.1:6700=words")
    assert (pull.name, pull.endpoints[0].bind) == ("words", False)
    assert parse_spec(Kind.PULL, "bind:tcp://127.0.0.1:6700=words").endpoints[0].bind
    assert parse_spec(Kind.PUSH, "tcp://127.0.0.1:1=words").endpoints[0].bind
    assert not parse_spec(Kind.PUSH, "connect:tcp://127.0.0.1:1=words").endpoints[0].bind
    rep = parse_spec(Kind.REP, "case=tcp://127.0.0.1:1,bind:tcp://127.0.0.1:2")
    assert rep.name == "case"
    assert [(e.url, e.bind) for e in rep.endpoints] == [
        ("tcp://127.0.0.1:1", False),
        ("tcp://127.0.0.1:2", True),
    ]
    assert parse_spec(Kind.REQ, "tcp://127.0.0.1:1=case").endpoints[0].bind


@pytest.mark.parametrize(
    ("kind", "text", "says"),
    [
        (Kind.PULL, "words", "takes URL=QUEUE"),
        (Kind.PULL, "tcp://127.0.0.1:1=", "takes URL=QUEUE"),
        (Kind.PUSH, "http://x=words", "not a ZeroMQ address"),
        (Kind.REP, "case=", "takes SERVICE=URL"),
        (Kind.REP, "case=tcp://127.0.0.1:1,", "takes SERVICE=URL"),
        (Kind.REQ, "tcp://127.0.0.1:1=bad name", "service name"),
        (Kind.REQ, "bind:=case", "not a ZeroMQ address"),
    ],
)
def test_bad_specs_raise_configuration_error(kind, text, says) -> None:
    with pytest.raises(pigeon.ConfigurationError, match=says):
        parse_spec(kind, text)


def test_unknown_kind_is_a_configuration_error() -> None:
    with pytest.raises(pigeon.ConfigurationError, match="pull, push, rep, req"):
        open_bridge(None, "pub", "tcp://127.0.0.1:1=x")


def test_plain_body_rules() -> None:
    assert plain_body([b"word"]) == b"word"
    assert plain_body([b""]) is Malformed.EMPTY
    assert plain_body([]) is Malformed.EMPTY
    assert plain_body([b"a", b"b"]) is Malformed.MULTIPART


def test_lazy_pirate_rotates_skips_a_failed_server_and_gives_up() -> None:
    pirate = LazyPirate(2, attempts=3, cooldown=5.0)
    assert [pirate.choose(0.0), pirate.choose(0.0), pirate.choose(0.0)] == [0, 1, 0]
    pirate.timed_out(1, now=1.0)
    assert [pirate.choose(2.0), pirate.choose(2.0)] == [0, 0]  # 1 cools down
    assert pirate.choose(6.5) == 1  # cooled down
    pirate.timed_out(0, now=7.0)
    pirate.timed_out(1, now=8.0)
    assert pirate.choose(9.0) == 0  # all cooling: the one that failed longest ago
    assert pirate.retry(1, 9.0, None) and not pirate.retry(3, 9.0, None)
    assert not pirate.retry(1, 9.0, deadline=8.0)


# -- the CLI ---------------------------------------------------------------


def test_cli_help_lists_the_four_kinds() -> None:
    done = subprocess.run([*PIGEON, "bridge", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--pull URL=QUEUE", "--push URL=QUEUE", "--rep SERVICE=URL", "--req URL=SERVICE"):
        assert flag in done.stdout
    assert "--node" in done.stdout and "--key" in done.stdout and "--server-key" in done.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--pull", "nonsense"], "--pull takes URL=QUEUE"),
        (["--rep", "case"], "--rep takes SERVICE=URL"),
        (["--push", "ftp://x=words"], "not a ZeroMQ address"),
    ],
)
def test_cli_bad_spec_is_a_usage_error(args, says) -> None:
    done = subprocess.run(
        [*PIGEON, "bridge", "--node", "tcp://127.0.0.1:1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Usage: pigeon bridge" in done.stderr and says in done.stderr, done.stderr


# -- each kind, against raw sockets ------------------------------------------


def test_pull_stores_plain_words_and_counts_malformed_frames() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        plain, node = free_tcp(), free_tcp()
        fountain = raw(ctx, zmq.PUSH)
        fountain.bind(plain)
        got: list[bytes] = []
        async with pigeon.connect(bind=node) as conn:
            async with open_bridge(conn, "pull", f"{plain}=words") as bridge:

                async def take(delivery: pigeon.Delivery) -> None:
                    assert delivery.message.content_type == pigeon.BYTES
                    got.append(delivery.body)

                await conn.consume("words", take)
                await fountain.send(b"one")
                await fountain.send_multipart([b"two", b"parts"])
                await fountain.send(b"")
                for word in (b"two", b"three"):
                    await fountain.send(word)
                await until(lambda: len(got) == 3)
                stats = bridge.stats()
        assert got == [b"one", b"two", b"three"]
        assert (stats["received"], stats["passed"], stats["malformed"]) == (5, 3, 2)
        assert stats["malformed_multipart"] == stats["malformed_empty"] == 1
        assert stats["dropped"] == 0
        fountain.close()
        ctx.term()

    run(main())


def test_pull_with_bind_prefix_takes_connecting_push_peers() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        plain, node = free_tcp(), free_tcp()
        got: list[bytes] = []
        async with pigeon.connect(bind=node) as conn:
            async with open_bridge(conn, "pull", f"bind:{plain}=words"):
                await conn.consume("words", lambda d: got.append(d.body))
                push = raw(ctx, zmq.PUSH)
                push.connect(plain)
                await push.send(b"hello")
                await until(lambda: got == [b"hello"])
                push.close()
        ctx.term()

    run(main())


def test_push_without_a_peer_is_backpressure_not_loss() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        plain, node = free_tcp(), free_tcp()
        async with pigeon.connect(bind=node) as conn:
            for n in range(10):
                await conn.send("words", f"w{n}".encode())
            bridge = open_bridge(conn, "push", f"{plain}=words", max_in_flight=2)
            bridge.send_timeout = 0.2  # type: ignore[attr-defined]
            async with bridge:
                await until(lambda: bridge.stats()["send_waits"] >= 3)
                stats = bridge.stats()
                assert (stats["passed"], stats["dropped"]) == (0, 0), stats
                # The rest waits in the queue, not in the bridge.
                queue = conn.stats()["queues"]["words"]
                assert queue["ready"] + queue["in_flight"] == 10, queue
                pull = raw(ctx, zmq.PULL)
                pull.connect(plain)
                got = [await asyncio.wait_for(pull.recv(), 30) for _ in range(10)]
                assert got == [f"w{n}".encode() for n in range(10)]
                await until(lambda: bridge.stats()["passed"] == 10)
                await until(lambda: conn.stats()["queues"]["words"]["acked"] == 10)
                assert bridge.stats()["dropped"] == 0
                pull.close()
        ctx.term()

    run(main())


def test_push_with_connect_prefix_reaches_a_binding_pull_peer() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        plain, node = free_tcp(), free_tcp()
        pull = raw(ctx, zmq.PULL)
        pull.bind(plain)
        async with pigeon.connect(bind=node) as conn:
            async with open_bridge(conn, "push", f"connect:{plain}=words") as bridge:
                await conn.send("words", b"hi")
                await conn.send("words", b"")  # no plain peer can take it: dead-lettered
                assert await asyncio.wait_for(pull.recv(), 30) == b"hi"
                await until(lambda: bridge.stats()["malformed"] == 1)
                await until(lambda: conn.stats()["queues"]["words"].get("dead_lettered", 0) == 1)
        pull.close()
        ctx.term()

    run(main())


async def plain_rep(ctx: zmq.asyncio.Context, url: str, change) -> None:
    sock = raw(ctx, zmq.REP)
    sock.bind(url)
    try:
        while True:
            await sock.send(change(await sock.recv()))
    finally:
        sock.close()


def test_rep_fails_over_from_a_dead_server_to_the_next() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        dead, live, node = free_tcp(), free_tcp(), free_tcp()
        server = asyncio.ensure_future(plain_rep(ctx, live, bytes.upper))
        async with pigeon.connect(bind=node) as host, pigeon.connect(node) as client:
            bridge = open_bridge(host, "rep", f"case={dead},{live}")
            bridge.attempt_timeout = 0.5  # type: ignore[attr-defined]
            async with bridge:
                replies = [
                    (await client.request("case", w, timeout=30)).body
                    for w in (b"a", b"b", b"c", b"d")
                ]
                stats = bridge.stats()
        assert replies == [b"A", b"B", b"C", b"D"]
        assert stats["passed"] == 4 and stats["dropped"] == 0, stats
        assert stats["timeouts"] >= 1 and stats["failovers"] >= 1, stats
        # The dead server cools down: it is not tried for every call.
        assert stats["timeouts"] < 4, stats
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        ctx.term()

    run(main())


def test_rep_counts_a_multipart_reply_and_the_caller_gets_an_error() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        plain, node = free_tcp(), free_tcp()
        rep = raw(ctx, zmq.REP)
        rep.bind(plain)

        async def bad() -> None:
            await rep.recv()
            await rep.send_multipart([b"two", b"parts"])

        task = asyncio.ensure_future(bad())
        async with pigeon.connect(bind=node) as host, pigeon.connect(node) as client:
            async with open_bridge(host, "rep", f"case={plain}") as bridge:
                with pytest.raises(pigeon.Rejected, match="multipart"):
                    await client.request("case", b"x", timeout=30)
                stats = bridge.stats()
        assert stats["malformed_multipart"] == 1 and stats["dropped"] == 1, stats
        await task
        rep.close()
        ctx.term()

    run(main())


def test_req_answers_plain_clients_and_malformed_requests_with_an_error() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        plain, node = free_tcp(), free_tcp()
        async with pigeon.connect(bind=node) as conn:
            await conn.serve("case", lambda m: m.body.upper())
            async with open_bridge(conn, "req", f"{plain}=case") as bridge:
                req = raw(ctx, zmq.REQ)
                req.connect(plain)
                await req.send(b"abc")
                assert await asyncio.wait_for(req.recv(), 30) == b"ABC"
                await req.send(b"")
                empty = await asyncio.wait_for(req.recv(), 30)
                assert empty.startswith(ERROR_PREFIX) and b"empty" in empty
                # A DEALER speaks REQ's envelope and can send several frames.
                dealer = raw(ctx, zmq.DEALER)
                dealer.connect(plain)
                await dealer.send_multipart([b"", b"a", b"b"])
                answer = await asyncio.wait_for(dealer.recv_multipart(), 30)
                assert answer[0] == b"" and answer[1].startswith(ERROR_PREFIX)
                assert b"multipart" in answer[1]
                stats = bridge.stats()
                req.close()
                dealer.close()
        assert (stats["received"], stats["passed"], stats["malformed"]) == (3, 1, 2), stats
        ctx.term()

    run(main())


def test_req_answers_a_service_error_instead_of_leaving_the_client_stuck() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        plain, node = free_tcp(), free_tcp()
        async with pigeon.connect(bind=node) as conn:
            async with open_bridge(conn, "req", f"{plain}=nobody") as bridge:
                req = raw(ctx, zmq.REQ)
                req.connect(plain)
                await req.send(b"hello")
                answer = await asyncio.wait_for(req.recv(), 30)
                assert answer.startswith(ERROR_PREFIX + b"NoResponders"), answer
                assert bridge.stats()["failed"] == 1
                req.close()
        ctx.term()

    run(main())


def test_docs_bridges_python_example_runs() -> None:
    import re
    import sys
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "bridges.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and done.stdout.strip(), done.stdout + done.stderr
