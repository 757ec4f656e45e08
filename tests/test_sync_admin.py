"""pigeon.sync.open_admin, the blocking twin of pigeon.admin, against real
systems: memory:// (the broker of this process, which sync connections share
with it on the loop thread), a brokerless node over tcp://, NATS and
RabbitMQ (these two skip without a broker, and fail in CI)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import brokers
import pytest

import pigeon
import pigeon.sync
from pigeon.admin import QUEUE_FIELDS, Unreachable
from pigeon.testing.conformance import unique

WAIT = 30.0
T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """Call ``check`` until it returns something true, and return that;
    AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)
    return result


def ready(admin: pigeon.sync.Admin, queue: str) -> int | None:
    row = admin.queues().get(queue)
    return None if row is None else row["ready"]


def exercise(conn: pigeon.sync.Connection, admin: pigeon.sync.Admin) -> None:
    """Ready messages counted and purged, a rejected message seen as a dead
    letter and replayed, all through the blocking admin."""
    for n in range(3):
        conn.send("jobs", {"n": n})
    wait_for(lambda: ready(admin, "jobs") == 3, "3 ready in 'jobs'")
    queues = admin.queues()
    assert set(QUEUE_FIELDS) <= set(queues["jobs"])
    assert queues["jobs"]["dead"] == 0
    assert admin.purge("jobs") == 3
    assert ready(admin, "jobs") == 0

    worker = conn.consume("bad", lambda delivery: delivery.reject("no stock"))
    conn.send("bad", {"n": 9})
    wait_for(lambda: admin.queues().get("bad", {}).get("dead") == 1, "a dead letter of 'bad'")
    worker.close()  # nobody takes it again once replayed
    letters = admin.dead("bad")
    assert len(letters) == 1
    assert letters[0]["body"] == '{"n":9}' and "no stock" in letters[0]["reason"]
    assert admin.replay("bad") == 1
    row = admin.queues()["bad"]
    assert row["ready"] == 1 and row["dead"] == 0
    assert admin.dead("bad") == []
    assert admin.purge("bad") == 1


def test_memory_admin_sees_what_a_sync_connection_made() -> None:
    name = unique("sync-admin")
    with pigeon.sync.connect(f"memory://{name}") as conn:
        with pigeon.sync.open_admin(f"memory://{name}") as admin:
            assert isinstance(admin, pigeon.sync.Admin)
            assert admin.transport == "memory" and admin.url == f"memory://{name}"
            assert admin.info()["connections"] == 1
            exercise(conn, admin)
            assert admin.ping() >= 0.0
    # The broker went with its last connection.
    with pigeon.sync.open_admin(f"memory://{name}") as admin:
        assert admin.queues() == {}


@pytest.fixture
def node() -> Iterator[str]:
    """A brokerless node on a free port; its address."""
    with pigeon.sync.connect(bind=brokers.ANY_PORT) as host:
        yield host.stats()["bound"][0]


def test_node_admin_over_tcp(node: str) -> None:
    with pigeon.sync.connect(node) as conn, pigeon.sync.open_admin(node, timeout=WAIT) as admin:
        assert admin.transport == "zmq" and admin.url == node
        info = admin.info()
        assert info["transport"] == "zmq" and info["node"]
        assert admin.ping() > 0
        exercise(conn, admin)
        overview = admin.overview()
        assert overview["node"] == info["node"] and "jobs" in overview["queues"]
        assert isinstance(admin.services(), dict) and isinstance(admin.peers(), list)


def test_leaving_the_with_closes_the_session(node: str) -> None:
    with pigeon.sync.open_admin(node, timeout=WAIT) as admin:
        assert admin.ping() > 0
    # What the async node admin raises once its connection is closed.
    with pytest.raises(pigeon.ClosedError):
        admin.queues()
    admin.close()  # idempotent
    # A memory:// session holds nothing, so closing it changes nothing (as async).
    with pigeon.sync.open_admin("memory://sync-admin-closed") as memory_admin:
        pass
    assert memory_admin.queues() == {}


def test_nothing_listening_is_unreachable_at_once() -> None:
    with brokers.Unlistened() as url:
        started = time.monotonic()
        with pytest.raises(Unreachable, match=f"Nothing reachable at {url}"):
            pigeon.sync.open_admin(url, timeout=WAIT)
        assert time.monotonic() - started < WAIT / 2


def test_an_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(pigeon.ConfigurationError, match="no admin backend"):
        pigeon.sync.open_admin("http://127.0.0.1:1")


def two_ready_then_purged(url: str, queue: str, **options: object) -> None:
    """Send 2 to ``queue``, see them ready, purge them (purged even on a
    failure); a call once the ``with`` closed the session raises."""
    with pigeon.sync.connect(url) as conn:
        with pigeon.sync.open_admin(url, timeout=WAIT, **options) as admin:
            try:
                conn.send(queue, "one")
                conn.send(queue, "two")
                wait_for(lambda: ready(admin, queue) == 2, f"2 ready in {queue!r}")
                assert admin.purge(queue) == 2
                # NATS no longer lists a queue with nothing stored and no consumer.
                wait_for(lambda: ready(admin, queue) in (0, None), f"{queue!r} purged")
            finally:
                admin.purge(queue)  # nothing left on the shared broker
    # Closed by the with: what the async NATS and RabbitMQ admins raise then.
    with pytest.raises(pigeon.TransportError):
        admin.queues()


def test_nats() -> None:
    url = brokers.require(brokers.NATS_URL)
    two_ready_then_purged(url, unique("sa"))


def test_rabbitmq() -> None:
    url = brokers.require(brokers.AMQP_URL)
    queue = unique("sa")
    # Shown even before the broker's inventory lists it.
    two_ready_then_purged(url, queue, queues=[queue])


def test_an_admin_left_open_is_closed_at_exit() -> None:
    """Like a sync connection, a sync admin session nobody closed is closed
    when the interpreter exits (an amqp:// one would otherwise drop its
    connection without a close)."""
    script = (
        "import pigeon.sync\n"
        "admin = pigeon.sync.open_admin('memory://left-open')\n"
        "inner = admin._admin\n"
        "close = inner.close\n"
        "async def told():\n"
        "    print('closed', flush=True)\n"
        "    await close()\n"
        "inner.close = told\n"
        "closed = pigeon.sync.open_admin('memory://closed')\n"
        "closed.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["closed"]
