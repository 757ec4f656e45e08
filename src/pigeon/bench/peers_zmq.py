"""Raw pyzmq peers, written the fast way.

These are the ceiling a Python library over ZeroMQ can reach, so they must not
be handicapped: one ``send``/``recv`` of ``bytes`` per message (no multipart
helpers, which cost several times more per call), plain-int flags, default
HWM, blocking sync sockets, and every party in its own process.

The CURVE rows are the same sockets with ``curve_server``/``curve_secretkey``
on the side that binds and ``curve_serverkey``/``curve_publickey``/
``curve_secretkey`` on the side that connects. The binding side runs pyzmq's
own ZAP handler (:class:`zmq.auth.thread.ThreadAuthenticator`) letting in the
client's key only, as a user who wants keys checked would; it is asked once
per connection, at the handshake, so it costs nothing per message.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from pigeon.bench import curve as curve_mod
from pigeon.bench.harness import (
    GRACE_S,
    Ctl,
    Tally,
    free_port,
    reporting,
    retry_on_port_clash,
)
from pigeon.bench.shapes import run_backlog, run_queue, run_rpc

# Plain ints: IntFlag arithmetic on every call is measurable at this rate.
SNDMORE = int(zmq.SNDMORE)
LOCAL = "tcp://127.0.0.1"


class _OneKey:
    """ZAP decision for :class:`ThreadAuthenticator`: only the bench's client key."""

    def __init__(self, key: str) -> None:
        self.key = key.encode("ascii")

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


Context = zmq.Context[zmq.Socket[bytes]]


def _server_socket(ctx: Context, kind: int, ctl: Ctl) -> tuple[zmq.Socket[bytes], Any]:
    """A socket for the side that binds; with CURVE keys in ``cfg``, a CURVE
    server, and the ZAP handler started on ``ctx`` (returned, to stop)."""
    sock = ctx.socket(kind)
    keys = ctl.cfg.get("curve")
    if not keys:
        return sock, None
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", _OneKey(keys["client_public"]))
    sock.curve_server = True
    sock.curve_secretkey = keys["server_secret"].encode("ascii")
    assert sock.mechanism == zmq.CURVE
    return sock, auth


def _client_socket(ctx: Context, kind: int, ctl: Ctl) -> zmq.Socket[bytes]:
    """A socket for the side that connects; a CURVE client with keys in ``cfg``."""
    sock = ctx.socket(kind)
    if keys := ctl.cfg.get("curve"):
        sock.curve_serverkey = keys["server_public"].encode("ascii")
        sock.curve_publickey = keys["client_public"].encode("ascii")
        sock.curve_secretkey = keys["client_secret"].encode("ascii")
        assert sock.mechanism == zmq.CURVE
    return sock


def _close(sock: zmq.Socket[bytes], ctx: Context, auth: Any) -> None:
    sock.close(linger=0)
    if auth is not None:
        auth.stop()
    ctx.term()


def _with_keys(
    run: Callable[[dict[str, Any]], dict[str, Any]], cfg: dict[str, Any], curve: bool
) -> dict[str, Any]:
    """Call ``run(cfg)``, with fresh CURVE keys in ``cfg["curve"]`` if ``curve``."""
    if not curve:
        return run(cfg)
    with curve_mod.curve_keys() as keys:
        return run(dict(cfg, curve=keys))


def _stop_wait(ctl: Ctl) -> None:
    # Keep the sending socket open until the parent has seen every message
    # arrive: delivery must not depend on linger at close.
    ctl.stop.wait(10 * GRACE_S)


# --------------------------------------------------------------------- queue


def queue_producer(ctl: Ctl) -> None:
    """PUSH bound on a random port; send for ``seconds``."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock, auth = _server_socket(ctx, zmq.PUSH, ctl)
        ctl.port.value = sock.bind_to_random_port(LOCAL)
        ctl.bound.set()
        ctl.wait_workers()
        time.sleep(0.2)  # connects are asynchronous; let all three pipes attach
        body = b"x" * ctl.cfg["size"]
        send = sock.send
        n = 0
        t0 = time.perf_counter()
        end = t0 + ctl.cfg["seconds"]
        ctl.t0.value = t0
        while True:
            for _ in range(1000):  # check the clock only every 1000 sends
                send(body)
            n += 1000
            if time.perf_counter() >= end:
                break
        ctl.sent.value = n
        ctl.done.set()
        _stop_wait(ctl)
        _close(sock, ctx, auth)


def queue_worker(ctl: Ctl, i: int) -> None:
    """PULL connected to the producer; count deliveries."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = _client_socket(ctx, zmq.PULL, ctl)
        sock.rcvtimeo = 50  # wake up regularly to publish the tally and see stop
        sock.connect(f"{LOCAL}:{ctl.port.value}")
        ctl.worker_ready()
        recv = sock.recv
        clock = time.perf_counter
        tally = Tally()
        while not ctl.stop.is_set():
            n, last = tally.n, tally.last
            try:
                while True:
                    recv()
                    # A clock read per message (~50 ns) is cheap next to recv,
                    # and the single producer is the bottleneck anyway.
                    last = clock()
                    n += 1
                    if not n & 0x3FF:
                        tally.n, tally.last = n, last
                        tally.publish(ctl, i)
            except zmq.Again:
                pass
            tally.n, tally.last = n, last
            tally.publish(ctl, i)
        sock.close(linger=0)
        ctx.term()


def queue(opts: Any, size: int, curve: bool = False) -> dict[str, Any]:
    """pyzmq PUSH → 3 PULL, no acks (``curve``: encrypted, keys checked by ZAP)."""
    return _with_keys(
        lambda cfg: run_queue(queue_producer, queue_worker, cfg, opts.seconds),
        {"size": size},
        curve,
    )


# ----------------------------------------------------------------------- rpc


def rep_server(ctl: Ctl) -> None:
    """REP echo server."""
    _echo_server(ctl, zmq.REP)


def router_server(ctl: Ctl) -> None:
    """ROUTER echo server: identity frame + body frame, two plain recv calls."""
    _echo_server(ctl, zmq.ROUTER)


def _echo_server(ctl: Ctl, kind: int) -> None:
    with reporting(ctl):
        ctx = zmq.Context()
        sock, auth = _server_socket(ctx, kind, ctl)
        sock.rcvtimeo = 100  # to notice stop
        ctl.port.value = sock.bind_to_random_port(LOCAL)
        ctl.bound.set()
        recv, send = sock.recv, sock.send
        while not ctl.stop.is_set():
            try:
                if kind == zmq.ROUTER:
                    while True:
                        ident = recv()
                        body = recv()
                        send(ident, SNDMORE)
                        send(body)
                else:
                    while True:
                        send(recv())
            except zmq.Again:
                pass
        _close(sock, ctx, auth)


def req_client(ctl: Ctl) -> None:
    """REQ client, one request in flight; records every round trip."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = _client_socket(ctx, zmq.REQ, ctl)
        sock.connect(f"{LOCAL}:{ctl.port.value}")
        body = b"x" * ctl.cfg.get("size", 16)
        send, recv, clock = sock.send, sock.recv, time.perf_counter_ns
        for _ in range(200):  # warm up connection and caches
            send(body)
            recv()
        lat = []
        t0 = time.perf_counter()
        end = t0 + ctl.cfg["seconds"]
        while time.perf_counter() < end:
            t = clock()
            send(body)
            recv()
            lat.append(clock() - t)
        elapsed = time.perf_counter() - t0
        ctl.results.put({"n": len(lat), "elapsed": elapsed, "lat_ns": lat})
        sock.close(linger=0)
        ctx.term()


def dealer_client(ctl: Ctl) -> None:
    """DEALER client keeping ``window`` requests in flight."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = _client_socket(ctx, zmq.DEALER, ctl)
        sock.connect(f"{LOCAL}:{ctl.port.value}")
        body = b"x" * 16
        send, recv, clock = sock.send, sock.recv, time.perf_counter_ns
        window = ctl.cfg["window"]
        # The echo answers in order: each reply is the oldest request's.
        sent: deque[int] = deque()
        for _ in range(window):
            sent.append(clock())
            send(body)
        lat: list[int] = []
        t0 = time.perf_counter()
        end = t0 + ctl.cfg["seconds"]
        while True:
            for _ in range(100):
                recv()
                now = clock()
                lat.append(now - sent.popleft())
                sent.append(now)
                send(body)
            if time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - t0
        for _ in range(window):  # take back what is still in flight
            recv()
        ctl.results.put({"n": len(lat), "elapsed": elapsed, "lat_ns": lat})
        sock.close(linger=0)
        ctx.term()


def rpc_latency(opts: Any, curve: bool = False) -> dict[str, Any]:
    """REQ/REP, one request in flight (``curve``: encrypted, keys checked by ZAP)."""
    return _with_keys(lambda cfg: run_rpc(rep_server, req_client, cfg, opts.seconds), {}, curve)


def req_rep_round_trips(opts: Any, size: int) -> dict[str, Any]:
    """REQ/REP with ``size`` bytes each way, one request at a time: the floor
    for a send that waits for its confirm (one round trip per message)."""
    return run_rpc(rep_server, req_client, {"size": size}, opts.seconds)


def rpc_ten_in_flight(opts: Any) -> dict[str, Any]:
    """DEALER/ROUTER, 10 requests in flight."""
    return run_rpc(router_server, dealer_client, {"window": 10}, opts.seconds)


def rpc_throughput(opts: Any, curve: bool = False) -> dict[str, Any]:
    """DEALER/ROUTER, 100 requests in flight (``curve``: encrypted, keys checked by ZAP)."""
    return _with_keys(
        lambda cfg: run_rpc(router_server, dealer_client, cfg, opts.seconds),
        {"window": 100},
        curve,
    )


# ------------------------------------------------------------------- backlog


def backlog_holder(ctl: Ctl) -> None:
    """PUSH that connects before anyone listens; SNDHWM 0 keeps all of it queued."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.sndhwm = 0  # unlimited: the whole backlog lives in this process
        sock.connect(f"{LOCAL}:{ctl.cfg['port']}")
        ctl.bound.set()
        body = b"x" * ctl.cfg["size"]
        send = sock.send
        ctl.t0.value = time.perf_counter()
        for _ in range(ctl.cfg["count"]):
            send(body)
        ctl.done.set()
        _stop_wait(ctl)
        sock.close(linger=0)
        ctx.term()


def backlog_worker(ctl: Ctl, i: int) -> None:
    """PULL bound on the port the holder is connecting to; drain everything."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.bind(f"{LOCAL}:{ctl.cfg['port']}")
        recv = sock.recv
        recv()
        t_first = time.perf_counter()
        for _ in range(ctl.cfg["count"] - 1):
            recv()
        elapsed = time.perf_counter() - t_first
        ctl.results.put({"n": ctl.cfg["count"] - 1, "elapsed": elapsed})
        sock.close(linger=0)
        ctx.term()


def backlog(opts: Any) -> dict[str, Any]:
    """1 M messages queued in the sender's PUSH pipe, then drained.

    The port is picked before the receiver binds it (the sender connects
    first), so a run whose port was taken meanwhile is run again.
    """
    return retry_on_port_clash(
        lambda: run_backlog(
            backlog_holder, backlog_worker, {"port": free_port(), "size": 100}, opts.count
        )
    )
