"""Watches a DEALER socket's connection through libzmq's socket monitor.

Monitor events tell at once that the TCP connection dropped, far sooner
than missed heartbeats would, and when a new one is ready to carry frames
(after the ZMTP handshake; with IMMEDIATE, frames are dropped before it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

FAILED_HANDSHAKES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class ConnectionMonitor:
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
    ) -> None:
        self._sock = sock
        self._on_lost = on_lost
        self._on_ready = on_ready
        self._on_refused = on_refused
        self._loop = asyncio.get_running_loop()
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | FAILED_HANDSHAKES
        )
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
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._on_lost()
                elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._on_ready()
                elif event["event"] & FAILED_HANDSHAKES:
                    self._on_refused(int(event["event"]))
        except zmq.Again:
            pass

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
