"""Raw pyzmq peers, written the fast way.

These are the ceiling a Python library over ZeroMQ can reach, so they must not
be handicapped: one ``send``/``recv`` of ``bytes`` per message (no multipart
helpers, which cost several times more per call), plain-int flags, default
HWM, blocking sync sockets, and every party in its own process.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from pigeon.bench.harness import (
    GRACE_S,
    Ctl,
    Tally,
    free_port,
    reporting,
)
from pigeon.bench.shapes import run_backlog, run_queue, run_rpc

# Plain ints: IntFlag arithmetic on every call is measurable at this rate.
SNDMORE = int(zmq.SNDMORE)
LOCAL = "tcp://127.0.0.1"


def _stop_wait(ctl: Ctl) -> None:
    # Keep the sending socket open until the parent has seen every message
    # arrive: delivery must not depend on linger at close.
    ctl.stop.wait(10 * GRACE_S)


# --------------------------------------------------------------------- queue


def queue_producer(ctl: Ctl) -> None:
    """PUSH bound on a random port; send for ``seconds``."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
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
        sock.close(linger=0)
        ctx.term()


def queue_worker(ctl: Ctl, i: int) -> None:
    """PULL connected to the producer; count deliveries."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
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


def queue(opts: Any, size: int) -> dict[str, Any]:
    """pyzmq PUSH → 3 PULL, no acks."""
    return run_queue(queue_producer, queue_worker, {"size": size}, opts.seconds)


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
        sock = ctx.socket(kind)
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
        sock.close(linger=0)
        ctx.term()


def req_client(ctl: Ctl) -> None:
    """REQ client, one request in flight; records every round trip."""
    with reporting(ctl):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.connect(f"{LOCAL}:{ctl.port.value}")
        body = b"x" * 16
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
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"{LOCAL}:{ctl.port.value}")
        body = b"x" * 16
        send, recv = sock.send, sock.recv
        window = ctl.cfg["window"]
        for _ in range(window):
            send(body)
        n = 0
        t0 = time.perf_counter()
        end = t0 + ctl.cfg["seconds"]
        while True:
            for _ in range(100):
                recv()
                send(body)
            n += 100
            if time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - t0
        for _ in range(window):  # take back what is still in flight
            recv()
        ctl.results.put({"n": n, "elapsed": elapsed})
        sock.close(linger=0)
        ctx.term()


def rpc_latency(opts: Any) -> dict[str, Any]:
    """REQ/REP, one request in flight."""
    return run_rpc(rep_server, req_client, {}, opts.seconds)


def rpc_throughput(opts: Any) -> dict[str, Any]:
    """DEALER/ROUTER, 100 requests in flight."""
    return run_rpc(router_server, dealer_client, {"window": 100}, opts.seconds)


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
    """1 M messages queued in the sender's PUSH pipe, then drained."""
    cfg = {"port": free_port(), "size": 100}
    return run_backlog(backlog_holder, backlog_worker, cfg, opts.count)
