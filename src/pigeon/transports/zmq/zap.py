"""pigeon's ZAP handler: decides, at the CURVE handshake, which client keys
a node lets in (ZeroMQ RFC 27).

libzmq asks the ZAP handler of the socket's context, at the fixed address
``inproc://zeromq.zap.01``, once per handshake. One handler thread serves a
context; each node registers its own decision under its ZAP domain (its
node id), so nodes in one process keep separate allow-lists. A node's
decision is a callable, replaced atomically when its ACL is reloaded.

The user id a handshake is accepted with is the client's public key (Z85);
libzmq attaches it to every message from that connection as ``User-Id``,
so the node knows who sent a frame from the key, never from a name the
peer chose.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils import z85

ZAP_ADDRESS = "inproc://zeromq.zap.01"


@dataclass(slots=True)
class Domain:
    """What one node tells the handler: which keys it lets in, and counters."""

    allows: Callable[[str], bool]
    accepted: int = 0
    refused: int = 0
    last_refused: str = ""


class ZapHandler:
    """The handler thread of one zmq context (see the module docstring)."""

    _by_context: dict[int, ZapHandler] = {}
    _lock = threading.Lock()

    @classmethod
    def of(cls, context: zmq.Context[zmq.Socket[bytes]]) -> ZapHandler:
        """The handler of ``context``, started on first use."""
        with cls._lock:
            handler = cls._by_context.get(id(context))
            if handler is None or not handler._thread.is_alive():
                handler = cls._by_context[id(context)] = cls(context)
            return handler

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self._domains: dict[str, Domain] = {}
        self._sock = context.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ADDRESS)
        self._thread = threading.Thread(target=self._serve, name="pigeon-zap", daemon=True)
        self._thread.start()

    def register(self, domain: str, allows: Callable[[str], bool]) -> Domain:
        entry = self._domains[domain] = Domain(allows)
        return entry

    def unregister(self, domain: str) -> None:
        self._domains.pop(domain, None)

    def _serve(self) -> None:
        sock = self._sock
        while True:
            try:
                request = sock.recv_multipart()
            except zmq.ContextTerminated:
                sock.close(linger=0)
                return
            except zmq.ZMQError:
                continue
            sock.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        # version, request id, domain, address, identity, mechanism, credentials...
        if len(request) < 6 or request[0] != b"1.0":
            return [
                b"1.0",
                request[1] if len(request) > 1 else b"",
                b"500",
                b"bad request",
                b"",
                b"",
            ]
        version, request_id, domain, address, _identity, mechanism = request[:6]
        entry = self._domains.get(domain.decode("utf-8", "replace"))
        key = ""
        if mechanism == b"CURVE" and len(request) == 7 and len(request[6]) == 32:
            key = z85.encode(request[6]).decode("ascii")
        if entry is not None and key and entry.allows(key):
            entry.accepted += 1
            return [version, request_id, b"200", b"OK", key.encode("ascii"), b""]
        if entry is not None:
            entry.refused += 1
            who = key or mechanism.decode("ascii", "replace")
            entry.last_refused = f"{who} from {address.decode('ascii', 'replace')}"
        return [version, request_id, b"400", b"key not allowed", b"", b""]
