"""Watches a DEALER socket's connection through libzmq's socket monitor.

Monitor events tell at once that the TCP connection dropped, far sooner
than missed heartbeats would, and when a new one is ready to carry frames
(after the ZMTP handshake; with IMMEDIATE, frames are dropped before it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

FAILED_HANDSHAKES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class _Watcher:
    """Reads a socket's monitor events on the loop, each into ``_event``."""

    def __init__(self, sock: zmq.Socket[bytes], events: int) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._monitor = sock.get_monitor_socket(events)
        self._fd = int(self._monitor.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._read)
        # The monitor's FD is edge-triggered like any zmq FD: an event that
        # came before add_reader would not wake us, so look once now.
        self._loop.call_soon(self._read)

    def _read(self) -> None:
        if self._monitor.closed:
            return
        try:
            while True:
                self._event(recv_monitor_message(self._monitor, zmq.NOBLOCK))
        except zmq.Again:
            pass

    def _event(self, event: Mapping[str, Any]) -> None:
        raise NotImplementedError  # (each watcher reads its own events)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._sock.disable_monitor()
        self._monitor.close(linger=0)


class ConnectionMonitor(_Watcher):
    """Calls ``on_lost()`` when the connection drops, ``on_ready()`` when a
    handshake succeeds and ``on_refused(event)`` when one fails (a key was
    refused, or the two ends do not agree on keys)."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        *,
        on_lost: Callable[[], None],
        on_ready: Callable[[], None],
        on_refused: Callable[[int], None],
        on_dropped: Callable[[], None] | None = None,
        on_retried: Callable[[], None] | None = None,
    ) -> None:
        self._on_lost = on_lost
        # A connect attempt failed (refused: nothing listens there yet) and
        # libzmq will try again.
        self._on_retried = on_retried
        self._on_ready = on_ready
        self._on_refused = on_refused
        # A connection dropped in the handshake with no event saying why:
        # libzmq ended it for a protocol error (a socket type that cannot
        # talk to ours, e.g. a PUSH, or no ZeroMQ at all); see HandshakeWatch.
        self._on_dropped = on_dropped
        self._shaking = False
        events = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        super().__init__(sock, events | zmq.EVENT_CONNECT_RETRIED | FAILED_HANDSHAKES)

    def _event(self, event: Mapping[str, Any]) -> None:
        kind = event["event"]
        if kind == zmq.EVENT_CONNECTED:
            self._shaking = True
        elif kind == zmq.EVENT_DISCONNECTED:
            dropped, self._shaking = self._shaking, False
            if dropped and self._on_dropped is not None:
                self._on_dropped()
            self._on_lost()
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._shaking = False
            self._on_ready()
        elif kind == zmq.EVENT_CONNECT_RETRIED:
            if self._on_retried is not None:
                self._on_retried()
        elif kind & FAILED_HANDSHAKES:
            self._shaking = False
            self._on_refused(int(kind))


class HandshakeWatch(_Watcher):
    """Tells a serving (ROUTER) socket's connections that were dropped in
    the ZeroMQ handshake with no event saying why.

    libzmq reports a handshake that fails for a connection error or a key
    (``HANDSHAKE_FAILED_*``), but not one it ends for a protocol error, such
    as a socket type that cannot talk to a ROUTER (a PUSH): the connection
    is accepted, then dropped. Handshake events carry no file descriptor, so
    the accounting is by count: a connection dropped while some accepted one
    has no outcome yet is taken to be one of those.
    """

    def __init__(self, sock: zmq.Socket[bytes], *, on_dropped: Callable[[str], None]) -> None:
        self._on_dropped = on_dropped
        self._open: set[int] = set()  # accepted connections, by fd
        self._resolved = 0  # of those, how many had a handshake outcome
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
        super().__init__(sock, events | FAILED_HANDSHAKES)

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_ACCEPTED and isinstance(value, int):
            self._open.add(value)
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # The peer hung up in the handshake: a PUSH that saw our socket
            # type first does that (or a connection reset mid-handshake).
            self._resolved = min(self._resolved + 1, len(self._open))
            self._on_dropped(_where(event))
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED or (
            isinstance(kind, int) and kind & FAILED_HANDSHAKES
        ):
            self._resolved = min(self._resolved + 1, len(self._open))
        elif kind == zmq.EVENT_DISCONNECTED and value in self._open:
            assert isinstance(value, int)
            unresolved = len(self._open) > self._resolved
            self._open.discard(value)
            if not unresolved:
                self._resolved -= 1
            else:
                self._on_dropped(_where(event))


def _where(event: Mapping[str, Any]) -> str:
    # For an accepted connection libzmq names the address it came in on.
    endpoint = event["endpoint"]
    where = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
    return f"a connection to {where}"
