"""``pigeon send``, ``request``, ``publish``, ``subscribe`` and ``tail`` as a
user runs them: the real command line in a subprocess, against memory://, a
``pigeon node`` subprocess, NATS and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import brokers
import pytest
from brokers import ANY_PORT, Unlistened, completed, describe

import pigeon
from pigeon.message import new_id

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
WAIT = 30.0  # bound for what takes well under a second on a quiet machine


def cli(*args: str, input: str | None = None, timeout: float = 2 * WAIT) -> Any:
    """Run ``pigeon ARGS``; stdin is ``input`` (or empty, never a terminal)."""
    return subprocess.run(
        [*PIGEON, *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(*args: str, input: str | None = None) -> str:
    done = cli(*args, input=input)
    assert done.returncode == 0, completed(done)
    assert "Traceback" not in done.stderr, completed(done)
    return str(done.stdout)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    """``cli`` for a test that serves or consumes in its own event loop."""
    proc = await asyncio.create_subprocess_exec(
        *PIGEON,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 2 * WAIT)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    return subprocess.CompletedProcess(
        ["pigeon", *args], proc.returncode, out.decode(errors="replace"), err.decode()
    )


def run(main: Callable[[], Awaitable[None]], timeout: float = 4 * WAIT) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


# -- the places: a node, NATS, RabbitMQ --------------------------------------


class NodeProcess:
    """``pigeon node`` keeping the history of ``news.>``."""

    def __init__(self, logs: Path, *options: str) -> None:
        self.err = logs / "node.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*PIGEON, "node", "--bind", ANY_PORT, "--retain", "news.>:count=100", *options],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            banner = self.proc.stdout.readline() if selector.select(WAIT) else ""
        served = re.search(r"serving (tcp://\S+?);", banner)
        if not served:
            self.stop()
            raise AssertionError(describe("pigeon node", self.proc.poll(), self.err, banner))
        self.url = served.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate(timeout=WAIT)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    started = NodeProcess(tmp_path_factory.mktemp("node"))
    yield started
    started.stop()


class Place:
    """Where a test sends: a URL, and names of its own (cleaned up after)."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        tag = new_id()[-10:]
        self.queue = f"cli-{tag}"
        self.service = f"cli-svc-{tag}"
        self.topic = f"news.cli{tag}"
        self.stream = ""

    def clean(self) -> None:
        if self.kind == "nats":
            asyncio.run(_delete_nats_streams(brokers.NATS_URL, self.stream))
        elif self.kind == "amqp":
            asyncio.run(_delete_amqp_queue(self.queue))


async def _delete_nats_streams(server: str, stream: str) -> None:
    import nats

    nc = await nats.connect(server, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name == stream or name.startswith(stream + "_"):
                await js.delete_stream(name)
    finally:
        await nc.close()


async def _delete_amqp_queue(name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(brokers.AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


@pytest.fixture(
    params=[
        "tcp",
        pytest.param("nats", marks=pytest.mark.broker),
        pytest.param("amqp", marks=pytest.mark.broker),
    ]
)
def place(request: pytest.FixtureRequest) -> Iterator[Place]:
    kind = request.param
    if kind == "tcp":
        yield Place("tcp", request.getfixturevalue("node").url)
        return
    if kind == "nats":
        server = brokers.require(brokers.NATS_URL)
        tag = new_id()
        setup = Place("nats", f"{server}?stream=PIGEON_CLI_{tag}&prefix=cli{tag}")
        setup.stream = f"PIGEON_CLI_{tag}"
    else:
        setup = Place("amqp", brokers.require(brokers.AMQP_URL))
    yield setup
    setup.clean()


# -- memory:// ------------------------------------------------------------------


def test_send_on_memory_succeeds_alone() -> None:
    out = ok("send", "memory://", "jobs", "hello")
    assert out.startswith("sent 1 message to 'jobs'"), out


def test_publish_on_memory_succeeds_alone() -> None:
    summary = json.loads(ok("publish", "memory://", "news.a", "hi", "--count", "3", "--json"))
    assert summary["sent"] == 3 and summary["topic"] == "news.a", summary


def test_send_body_from_stdin_paced_by_rate() -> None:
    summary = json.loads(
        ok("send", "memory://", "jobs", "--count", "5", "--rate", "50", "--json", input="piped")
    )
    assert summary["sent"] == 5 and summary["queue"] == "jobs", summary
    # Paced from the start: the fifth is due 4/50 s after the first (a lower
    # bound, whatever the machine's speed).
    assert summary["seconds"] >= 4 / 50 * 0.99, summary


def test_request_on_memory_has_nobody_to_answer() -> None:
    done = cli("request", "memory://", "echo", "hi", "--timeout", "5")
    assert done.returncode == 1, completed(done)
    assert "NoResponders" in done.stderr and "'echo'" in done.stderr, completed(done)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["send", "memory://", "q", "x", "--header", "oops"], "expected NAME=VALUE"),
        (["send", "memory://", "q", "x", "--file", "-"], "not both"),
        (["send", "memory://", "q", "{", "--content-type", "json"], "not application/json"),
        (["send", "memory://", "q", "x", "--content-type", "yaml"], "unknown content type"),
        (["send", "memory://", "q", "x", "--count", "0"], "--count"),
        (["send", "memory://", "q", "x", "--rate", "0"], "--rate"),
        (["tail", "memory://", "news.>", "--last", "2", "--from-seq", "1"], "not both"),
        (["send", "memory://", "bad name", "x"], "queue"),
        (["subscribe", "memory://", "news..x", "--count", "1"], "pattern"),
    ],
)
def test_bad_usage_exits_2_saying_why(args: list[str], says: str) -> None:
    done = cli(*args)
    assert done.returncode == 2, completed(done)
    assert says in done.stderr, completed(done)
    assert "Traceback" not in done.stderr


def test_json_body_is_checked_and_sent_as_json(tmp_path: Path) -> None:
    body = tmp_path / "order.json"
    body.write_text('{"id": 7}')
    summary = json.loads(
        ok("send", "memory://", "orders", "--file", str(body), "--content-type", "json", "--json")
    )
    assert summary["sent"] == 1


# -- nothing there: exit 69 --------------------------------------------------------


def _unlistened(kind: str, port_url: str) -> str:
    port = port_url.rsplit(":", 1)[1]
    return {
        "tcp": port_url,
        "nats": f"nats://127.0.0.1:{port}",
        "amqp": f"amqp://guest:guest@127.0.0.1:{port}/",
        "inproc": "inproc://nobody",  # only its own process reaches it
    }[kind]


@pytest.mark.parametrize(
    ("kind", "command"),
    [
        ("tcp", ["send", "q", "x"]),
        ("tcp", ["request", "svc", "x"]),
        ("tcp", ["publish", "news.a", "x"]),
        ("tcp", ["subscribe", "news.>"]),
        ("tcp", ["tail", "news.>"]),
        ("nats", ["send", "q", "x"]),
        ("nats", ["subscribe", "news.>"]),
        ("amqp", ["request", "svc", "x"]),
        ("amqp", ["publish", "news.a", "x"]),
        ("inproc", ["send", "q", "x"]),
    ],
)
def test_nothing_reachable_exits_69_within_the_timeout(kind: str, command: list[str]) -> None:
    with Unlistened() as port_url:
        url = _unlistened(kind, port_url)
        done = cli(command[0], url, *command[1:], "--timeout", "1")
    address = url.replace("guest:guest@", "")
    assert done.returncode == 69, completed(done)
    assert f"Nothing reachable at {address}" in done.stderr, completed(done)
    assert "guest:guest" not in done.stderr  # no password in what is printed
    assert "Traceback" not in done.stderr


# -- send, request, publish, subscribe on every transport ------------------------


def test_send_with_count_and_rate_reaches_a_consumer(place: Place) -> None:
    async def main() -> None:
        done = await asyncio.to_thread(
            cli,
            "send",
            place.url,
            place.queue,
            "--count",
            "20",
            "--rate",
            "200",
            "--header",
            "origin=shell",
            "--json",
            input="a job from stdin",
        )
        assert done.returncode == 0, completed(done)
        summary = json.loads(done.stdout)
        assert summary["sent"] == 20 and summary["seconds"] >= 19 / 200 * 0.99, summary
        got: list[pigeon.Message] = []
        async with pigeon.connect(place.url) as conn:
            await conn.consume(place.queue, lambda d: got.append(d.message))
            await until(lambda: len(got) >= 20, "20 messages consumed")
        assert {m.text for m in got} == {"a job from stdin"}
        assert all(m.headers.get("origin") == "shell" for m in got)

    run(main)


def test_consume_takes_what_send_sent_and_acks_it(place: Place) -> None:
    for n in range(3):
        ok("send", place.url, place.queue, f"job {n}")
    taken = json_lines(ok("consume", place.url, place.queue, "--count", "2", "--json"))
    assert [m["body"] for m in taken] == ["job 0", "job 1"], taken
    assert all(m["queue"] == place.queue and m["attempt"] >= 1 for m in taken), taken
    rest = ok("consume", place.url, place.queue, "--count", "1")
    assert rest == "job 2\n", rest  # the first two were acked, not handed back


def test_request_prints_the_reply_and_with_count_the_latency(place: Place) -> None:
    async def main() -> None:
        async with pigeon.connect(place.url) as conn:
            await conn.serve(place.service, lambda m: m.text.upper())
            one = await acli("request", place.url, place.service, "hello", "--timeout", "10")
            assert one.returncode == 0, completed(one)
            assert one.stdout == "HELLO"  # to a pipe: the body's bytes, as they are
            many = await acli("request", place.url, place.service, "hi", "--count", "10", "--json")
            assert many.returncode == 0, completed(many)
            *replies, summary = json_lines(many.stdout)  # a line per reply, as it came
            assert [r["body"] for r in replies] == ["HI"] * 10, replies
            assert summary["requests"] == 10, summary
            assert 0 < summary["p50"] <= summary["p99"], summary
            text = await acli("request", place.url, place.service, "hi", "--count", "3")
            assert text.returncode == 0, completed(text)
            assert re.search(r"^3 replies from .* p50 [\d.]+ ms, p99 [\d.]+ ms$", text.stdout)

    run(main)


def test_subscribe_prints_what_publish_sends(place: Place) -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            *PIGEON,
            "subscribe",
            place.url,
            f"{place.topic}.>",
            "--count",
            "3",
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        waiting = asyncio.ensure_future(proc.communicate())
        try:
            # Nothing says when the subscriber listens: publish until it has
            # seen three (it ends itself then), within WAIT.
            deadline = time.monotonic() + WAIT
            while not waiting.done() and time.monotonic() < deadline:
                done = await acli("publish", place.url, f"{place.topic}.x", "tick", "--count", "2")
                assert done.returncode == 0, completed(done)
                await asyncio.wait({waiting}, timeout=0.5)
        finally:
            if not waiting.done():
                proc.kill()
        out, err = await waiting
        report = describe("pigeon subscribe", proc.returncode, err, out)
        assert proc.returncode == 0, report
        events = json_lines(out.decode())
        assert len(events) == 3, report
        assert {e["topic"] for e in events} == {f"{place.topic}.x"}, report
        assert {e["body"] for e in events} == {"tick"} and events[0]["encoding"] == "text"
        # Numbered per topic by whoever numbers it (a node, or on a broker
        # each publisher): rising for each.
        by_source: dict[str, list[int]] = {}
        for e in events:
            by_source.setdefault(e["headers"].get("x-pigeon-source", ""), []).append(e["seq"])
        for seqs in by_source.values():
            assert seqs == sorted(set(seqs)) and seqs[0] >= 1, report
        assert b"pigeon subscribe: 3 event(s)" in err, report

    run(main)


# -- tail, Ctrl-C, a closed pipe, a named subscription (on a node) ---------------------


def test_tail_starts_in_the_retained_history(node: NodeProcess) -> None:
    topic = f"news.t{new_id()[-8:]}"
    ok("publish", node.url, topic, "--count", "5", input="price")
    last = json_lines(ok("tail", node.url, topic, "--last", "2", "--count", "2", "--json"))
    assert [e["seq"] for e in last] == [4, 5], last
    lines = ok("tail", node.url, topic, "--from-seq", "2", "--count", "2").splitlines()
    assert lines == [f"{topic} 2 price", f"{topic} 3 price"], lines


def test_ctrl_c_ends_a_tail_with_its_count(node: NodeProcess) -> None:
    topic = f"news.c{new_id()[-8:]}"
    ok("publish", node.url, topic, "one")
    proc = subprocess.Popen(
        [*PIGEON, "tail", node.url, topic],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == f"{topic} 1 one\n", first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=WAIT)
    report = describe("pigeon tail", proc.returncode, err, first + out)
    assert proc.returncode == 0, report
    assert "pigeon tail: 1 event(s)" in err and "Traceback" not in err, report


def test_a_closed_pipe_ends_a_tail_quietly(node: NodeProcess) -> None:
    topic = f"news.p{new_id()[-8:]}"
    ok("publish", node.url, topic, "one")
    proc = subprocess.Popen(
        [*PIGEON, "tail", node.url, topic],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == f"{topic} 1 one\n".encode()
        proc.stdout.close()  # the reader goes away (``| head -1``)
        ok("publish", node.url, topic, "two")  # the next write finds the pipe closed
        proc.wait(WAIT)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == 0, describe("pigeon tail", proc.returncode, err)
    assert err == "", err  # quietly: no traceback, no handler error


def test_a_named_subscription_keeps_what_came_while_nobody_listened(node: NodeProcess) -> None:
    topic, name = f"news.n{new_id()[-8:]}", f"sub{new_id()[-8:]}"

    async def main() -> None:
        # The first run makes the subscription; publish until it saw one.
        first = asyncio.ensure_future(
            acli("subscribe", node.url, topic, "--name", name, "--count", "1")
        )
        deadline = time.monotonic() + WAIT
        while not first.done() and time.monotonic() < deadline:
            await acli("publish", node.url, topic, "early")
            await asyncio.wait({first}, timeout=0.5)
        done = await first
        assert done.returncode == 0, completed(done)
        # Nobody listens now; what is published is kept for the name (after
        # any "early" ones still on their way when the first run ended).
        await acli("publish", node.url, topic, "kept", "--count", "2")
        proc = await asyncio.create_subprocess_exec(
            *PIGEON,
            "subscribe",
            node.url,
            topic,
            "--name",
            name,
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        bodies: list[str] = []
        try:
            while bodies.count("kept") < 2:
                line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
                assert line, "the subscriber ended early"
                bodies.append(json.loads(line)["body"])
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), WAIT)
        assert proc.returncode == 0
        assert set(bodies) <= {"early", "kept"}, bodies


def test_send_delay_holds_the_message(node: NodeProcess) -> None:
    queue = f"later-{new_id()[-8:]}"

    async def main() -> None:
        sent = time.time()
        done = await acli("send", node.url, queue, "soon", "--delay", "1")
        assert done.returncode == 0, completed(done)
        got: list[float] = []
        async with pigeon.connect(node.url) as conn:
            await conn.consume(queue, lambda d: got.append(time.time()))
            await until(lambda: bool(got), "the delayed message")
        assert got[0] - sent >= 0.99, got[0] - sent  # not before its time

    run(main)


def test_a_refused_send_exits_1_naming_the_error(tmp_path: Path) -> None:
    policies = tmp_path / "queues.toml"
    policies.write_text('[queue."tiny"]\nmax_length = 2\n')
    node = NodeProcess(tmp_path, "--queues", str(policies))
    try:
        done = cli("send", node.url, "tiny", "x", "--count", "5", "--timeout", "10")
    finally:
        node.stop()
    assert done.returncode == 1, completed(done)
    assert "Backpressure" in done.stderr and "'tiny'" in done.stderr, completed(done)
    assert "Traceback" not in done.stderr


@pytest.mark.broker
def test_tail_on_nats_starts_in_the_stream(tmp_path: Path) -> None:
    server = brokers.require(brokers.NATS_URL)
    tag = new_id()
    place = Place("nats", f"{server}?stream=PIGEON_CLI_{tag}&prefix=cli{tag}")
    place.stream = f"PIGEON_CLI_{tag}"
    try:

        async def retain() -> None:
            async with pigeon.connect(place.url) as conn:
                await conn.retain("news.>", max_count=10)

        run(retain)
        ok("publish", place.url, place.topic, "hi", "--count", "3")
        lines = ok("tail", place.url, "news.>", "--last", "2", "--count", "2").splitlines()
        assert lines == [f"{place.topic} 2 hi", f"{place.topic} 3 hi"], lines
    finally:
        place.clean()


def test_a_terminal_gets_a_progress_bar() -> None:
    import os
    import pty

    terminal, its_end = pty.openpty()
    proc = subprocess.Popen(
        [*PIGEON, "send", "memory://", "q", "x", "--count", "20"],
        stdin=its_end,
        stdout=its_end,
        stderr=its_end,
    )
    os.close(its_end)
    out = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(terminal, selectors.EVENT_READ)
            deadline = time.monotonic() + 2 * WAIT
            while time.monotonic() < deadline and selector.select(deadline - time.monotonic()):
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:  # the child ended: its side of the terminal closed
                    break
                if not chunk:
                    break
                out += chunk
        proc.wait(WAIT)
    finally:
        os.close(terminal)
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "100%" in text and "sent 20 messages to 'q'" in text, text
