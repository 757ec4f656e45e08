"""examples/node: a Node.js producer, worker and client against a real
``pigeon node``, with pigeon peers on the other side (examples/node/python_side.py).

Proves: every message the Node producer had confirmed reaches a Python
worker; every message Python sent is acked by the Node worker (the node's
stats say acked, none redelivered, although the Node worker went silent
but for its heartbeats for longer than the node's grace); a Refuse
(``full``) reaches the Node producer as such; every call the Node client
made is answered (an answer, ``Rejected``, ``NoResponders``, or its own
timeout); and frames Node encodes decode in pigeon with the msgpack types
pigeon writes itself, and the other way round; and the Node codec passes
docs/protocol-vectors.json (examples/node/vectors.js).

Needs ``node`` and ``npm`` on PATH: skips without them, fails when ``CI``
is set. The npm packages go into examples/node/node_modules (``npm ci``),
reinstalled only when package-lock.json changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from brokers import ANY_PORT, completed, describe, unavailable

from pigeon._core import frames
from pigeon.message import Message

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
VECTORS = Path(__file__).resolve().parents[1] / "docs" / "protocol-vectors.json"
WAIT = 120.0  # bound for what takes a second or two on a quiet machine
NPM_WAIT = 900.0  # a first npm install on a slow network
STAMP = EXAMPLE / "node_modules" / ".pigeon-installed"
PIGEON = [sys.executable, "-m", "pigeon.cli.main"]

pytestmark = pytest.mark.timeout(NPM_WAIT + 4 * WAIT)


def _lock_digest() -> str:
    return hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def node() -> str:
    """``node``, with the example's packages installed (once per lock file)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("the Node.js example needs node and npm on PATH")
    installed = (EXAMPLE / "node_modules" / "zeromq").is_dir() and (
        EXAMPLE / "node_modules" / "@msgpack" / "msgpack"
    ).is_dir()
    if not (installed and STAMP.is_file() and STAMP.read_text() == _lock_digest()):
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=NPM_WAIT,
        )
        assert done.returncode == 0, completed(done, "npm ci")
        STAMP.write_text(_lock_digest())
    return node


def run_node(node: str, script: str, *args: str, timeout: float = WAIT) -> dict[str, Any]:
    """Run one example script; returns the JSON line it prints last."""
    done = subprocess.run(
        [node, script, *args], cwd=EXAMPLE, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, completed(done, script)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class Child:
    """A process this test started, killed by its PID at the end."""

    def __init__(self, args: list[str], logs: Path, name: str) -> None:
        self.name = name
        self.err = logs / f"{name}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)

    def first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise AssertionError(f"no output within {timeout} s\n{self.describe()}")
        return self.proc.stdout.readline()

    def describe(self) -> str:
        return describe(self.name, self.proc.poll(), self.err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(WAIT / 4)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(WAIT / 4)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def poll(check: Any, what: str, timeout: float = WAIT) -> Any:
    """Call ``check`` until it returns something true; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


SENT_BY_PYTHON = 120
SENT_BY_NODE = 150


@pytest.fixture
def system(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A ``pigeon node`` (queue ``capped`` holds at most 2) and python_side
    (serves upper/fail/slow behind it, consumes ``from-node``, has sent
    SENT_BY_PYTHON messages to ``to-node``)."""
    policies = tmp_path / "queues.toml"
    policies.write_text('[queue."capped"]\nmax_length = 2\n')
    children: list[Child] = []
    try:
        pigeon_node = Child(
            [*PIGEON, "node", "--bind", ANY_PORT, "--queues", str(policies)], tmp_path, "node"
        )
        children.append(pigeon_node)
        banner = pigeon_node.first_line(WAIT)
        served = re.search(r"serving (tcp://\S+?);", banner)
        assert served, f"{banner}\n{pigeon_node.describe()}"
        url = served.group(1)
        status = tmp_path / "side.json"
        side = Child(
            [
                sys.executable,
                str(EXAMPLE / "python_side.py"),
                url,
                "--consume",
                "from-node",
                "--send",
                str(SENT_BY_PYTHON),
                "--send-queue",
                "to-node",
                "--status",
                str(status),
            ],
            tmp_path,
            "python_side",
        )
        children.append(side)

        def read_status() -> dict[str, Any] | None:
            assert side.proc.poll() is None, side.describe()
            try:
                state: dict[str, Any] = json.loads(status.read_text())
            except (OSError, ValueError):
                return None
            return state if state["ready"] else None

        poll(read_status, "python_side ready")
        yield {"url": url, "status": read_status}
    finally:
        for child in reversed(children):
            child.stop()


def queue_stats(url: str) -> dict[str, Any]:
    done = subprocess.run(
        [*PIGEON, "queues", url, "--json", "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, completed(done, "pigeon queues")
    queues: dict[str, Any] = json.loads(done.stdout)["queues"]
    return queues


def test_node_programs_against_a_pigeon_node(node: str, system: dict[str, Any]) -> None:
    url, status = system["url"], system["status"]
    times: dict[str, float] = {}

    # The Node worker acks everything Python sent. Its first job lasts 4 s
    # with nothing but heartbeats on the wire (Hello every 0.5 s), past the
    # node's grace of 3 x 1 s: without them the node would take the lease
    # back and deliver the message again, marked redelivered.
    start = time.monotonic()
    worker = run_node(
        node,
        "worker.js",
        *("--url", url, "--queue", "to-node", "--prefetch", "16", "--lease-ttl", "60"),
        *("--expect", str(SENT_BY_PYTHON), "--hold-first", "4", "--heartbeat", "0.5"),
        *("--idle", "60", "--timeout", str(WAIT)),
    )
    times["worker"] = time.monotonic() - start
    sent = status()["sent"]
    assert len(sent) == SENT_BY_PYTHON
    assert worker["verdict"]["allowed"], worker["verdict"]
    assert sorted(set(worker["acked"])) == sorted(sent), worker
    assert worker["peer"]["errors"] == 0, worker["peer"]

    def acked_to_node() -> dict[str, Any] | None:
        stats = queue_stats(url)["to-node"]
        return stats if stats["acked"] >= SENT_BY_PYTHON else None

    stats = poll(acked_to_node, "the node counts every Node ack")
    assert stats["acked"] == SENT_BY_PYTHON
    assert stats["redelivered"] == 0, stats  # the heartbeats kept the lease
    assert stats["ready"] == 0 and stats["in_flight"] == 0, stats

    # The control: the same worker without heartbeats loses its lease
    # during a 6 s job (the node's grace is 3 s) and gets it redelivered.
    run_node(node, "producer.js", *("--url", url, "--queue", "control", "--count", "3"))
    control = run_node(
        node,
        "worker.js",
        *("--url", url, "--queue", "control", "--prefetch", "1", "--lease-ttl", "60"),
        *("--expect", "3", "--hold-first", "6", "--heartbeat", "0", "--idle", "30"),
    )
    assert control["received"] == 3, control

    def taken_back() -> dict[str, Any] | None:
        stats = queue_stats(url)["control"]
        return stats if stats["redelivered"] >= 1 else None

    poll(taken_back, "the silent worker's lease taken back")

    # The Node producer's messages all reach the Python worker.
    start = time.monotonic()
    producer = run_node(
        node,
        "producer.js",
        *("--url", url, "--queue", "from-node", "--count", str(SENT_BY_NODE)),
        *("--window", "32", "--timeout", str(WAIT)),
    )
    times["producer"] = time.monotonic() - start
    assert len(producer["confirmed"]) == SENT_BY_NODE, producer
    assert not producer["failed"] and not producer["unconfirmed"], producer

    def all_received() -> dict[str, Any] | None:
        state = status()
        return state if set(producer["confirmed"]) <= set(state["received"]) else None

    state = poll(all_received, "the Python worker has every confirmed message")
    assert sorted(state["bodies"]) == sorted(f"from node {i}" for i in range(SENT_BY_NODE))
    poll(lambda: queue_stats(url)["from-node"]["acked"] == SENT_BY_NODE, "from-node acked")

    # A Refuse: the queue holds at most 2, nobody consumes it.
    capped = run_node(
        node,
        "producer.js",
        *("--url", url, "--queue", "capped", "--count", "4", "--give-up", "2"),
        *("--timeout", str(WAIT)),
    )
    assert len(capped["confirmed"]) == 2, capped
    assert sorted(f["reason"] for f in capped["failed"]) == ["full", "full"], capped
    assert capped["refusals"]["full"] >= 2, capped

    # The Node client: every call answered, each error by its error_kind.
    start = time.monotonic()
    client = run_node(
        node,
        "client.js",
        *("--url", url, "--call", "upper=hello", "--count", "25", "--timeout", "30"),
    )
    times["client"] = time.monotonic() - start
    calls = client["calls"]
    assert len(calls) == 25
    assert [c.get("answer") for c in calls] == [f"HELLO {i}" for i in range(25)], calls
    errors = run_node(
        node,
        "client.js",
        *("--url", url, "--call", "fail=x", "--call", "missing=y", "--call", "slow=z"),
        *("--timeout", "2"),
    )
    fail, missing, slow = errors["calls"]
    assert (fail["ok"], fail["errorKind"]) == (False, "Rejected"), fail
    assert "asked to fail" in fail["error"], fail
    assert (missing["ok"], missing["errorKind"]) == (False, "NoResponders"), missing
    # slow sleeps 30 s: the client gives up at its deadline (or the server
    # says Timeout first).
    assert not slow["ok"] and (slow["timedOut"] or slow["errorKind"] == "Timeout"), slow
    print(f"\nNode example run times (s): {json.dumps({k: round(v, 2) for k, v in times.items()})}")


# -- the codec against pigeon's own ---------------------------------------------


def _same_types(ours: Any, theirs: Any, where: str = "$") -> None:
    """Equal, and of the same msgpack types all the way down (float is not
    int, bytes is not str); a frame may be shorter or longer than the other
    by optional trailing fields."""
    assert type(ours) is type(theirs), f"{where}: {ours!r} vs pigeon's {theirs!r}"
    if isinstance(ours, list):
        if where != "$":
            assert len(ours) == len(theirs), f"{where}: {ours!r} vs {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
            _same_types(a, b, f"{where}[{i}]")
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            _same_types(ours[key], theirs[key], f"{where}.{key}")
    else:
        assert ours == theirs, f"{where}: {ours!r} vs {theirs!r}"


def _message(mid: str, body: bytes, ctype: str, **extra: Any) -> Message:
    return Message(mid, body, ctype, {"x-k": "v"}, created_at=1700000000.0, **extra)


TEXT = "text/plain; charset=utf-8"
M1 = _message("m-1", b"hello", TEXT)
EXPECTED: dict[str, Any] = {
    "hello": frames.Hello("n1", "s1", ["upper"], False, 3),
    "send": frames.Send(
        "jobs",
        [
            M1,
            _message("m-2", b"\x00\x01\x02\xff", "application/octet-stream", deadline=1700000030.0),
            _message(
                "m-3",
                b'{"n":1}',
                "application/json",
                attempt=2,
                redelivered=True,
                deadline=1700000000.5,
            ),
        ],
    ),
    "confirm": frames.Confirm(["m-1", "m-2"]),
    "refuse": frames.Refuse([("m-1", "full", "queue 'jobs'"), ("m-2", "too large", "5 > 4 bytes")]),
    "consume": frames.Consume("jobs", 16, 30.0, 5),
    "cancel": frames.Cancel("jobs", True),
    "deliver": frames.Deliver("jobs", [M1]),
    "settle": frames.Settle(
        "jobs", ["m-1"], [("m-2", 0.0, "handed back")], [("m-3", "expired")], ["m-4"]
    ),
    "request": frames.Request("r-1", "upper", M1, 5.0),
    "reply": frames.Reply("r-1", M1),
    "reply_error": frames.Reply("r-2", None, "ValueError: no", "Rejected"),
    "error": frames.Error("bad frame"),
    "verdict": frames.Verdict("consume", "jobs", True, 16, 30.0),
}


def test_frames_node_encodes_decode_in_pigeon(node: str) -> None:
    done = subprocess.run(
        [node, "selftest.js", "encode"], cwd=EXAMPLE, capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, completed(done, "selftest.js encode")
    encoded = {k: bytes.fromhex(v) for k, v in json.loads(done.stdout).items()}
    assert encoded.keys() == EXPECTED.keys() | {"batch"}
    for name, expected in EXPECTED.items():
        data = encoded[name]
        # pigeon reads it (strictly: msgspec refuses str for bytes and so on) ...
        assert frames.decode(data) == expected, name
        # ... and the msgpack types are the ones pigeon writes (30.0 a float).
        ours = msgspec.msgpack.decode(data[1:])
        theirs = msgspec.msgpack.decode(frames.encode(expected)[1:])
        _same_types(ours, theirs)
    assert frames.decode_all(encoded["batch"]) == [EXPECTED["confirm"], EXPECTED["deliver"]]


def test_frames_pigeon_encodes_decode_in_node(node: str) -> None:
    inputs = {name: frames.encode(f).hex() for name, f in EXPECTED.items()}
    inputs["batch"] = frames.encode_batch(
        [frames.encode(EXPECTED["verdict"]), frames.encode(EXPECTED["deliver"])]
    ).hex()
    inputs["batch_in_batch"] = frames.encode_batch([bytes.fromhex(inputs["batch"])]).hex()
    inputs["str_body"] = "01" + msgspec.msgpack.encode([7, "q", [["id", "text body"]]]).hex()
    done = subprocess.run(
        [node, "selftest.js", "decode"],
        cwd=EXAMPLE,
        input=json.dumps(inputs),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, completed(done, "selftest.js decode")
    decoded = json.loads(done.stdout)
    assert "error" not in decoded["hello"], decoded["hello"]
    for name in EXPECTED:
        assert "error" not in decoded[name], (name, decoded[name])
    hello = decoded["hello"]["frames"][0]
    assert (hello["type"], hello["node"], hello["services"], hello["load"]) == (
        "Hello",
        "n1",
        ["upper"],
        3,
    )
    message = decoded["send"]["frames"][0]["messages"][1]
    assert message == {
        "id": "m-2",
        "body": {"hex": "000102ff"},
        "contentType": "application/octet-stream",
        "headers": {"x-k": "v"},
        "attempt": 0,
        "redelivered": False,
        "createdAt": 1700000000.0,
        "deadline": 1700000030.0,
    }
    settle = decoded["settle"]["frames"][0]
    assert settle["nacks"] == [{"id": "m-2", "delay": 0.0, "reason": "handed back"}]
    reply = decoded["reply_error"]["frames"][0]
    assert (reply["message"], reply["errorKind"], reply["error"]) == (
        None,
        "Rejected",
        "ValueError: no",
    )
    batch = decoded["batch"]
    assert batch["batched"] and [f["type"] for f in batch["frames"]] == ["Verdict", "Deliver"]
    assert "another Batch" in decoded["batch_in_batch"]["error"]
    assert "bytes" in decoded["str_body"]["error"]  # a body must be bin, not str


def test_node_codec_passes_the_protocol_vectors(node: str) -> None:
    """vectors.js: every vector of docs/protocol-vectors.json decodes in
    wire.js to its fields, and all but the decode-only ones encode back to
    exactly their hex (it names the first vector that fails)."""
    vectors = json.loads(VECTORS.read_text())
    round_trip, decode_only = len(vectors["vectors"]), len(vectors["decode_only"])
    assert round_trip and decode_only
    result = run_node(node, "vectors.js")
    assert result == {
        "passed": round_trip + decode_only,
        "total": round_trip + decode_only,
        "roundTrip": round_trip,
        "decodeOnly": decode_only,
    }, result
