"""Wire frames between pigeon nodes (see docs/protocol.md).

Every frame is one ZeroMQ message part: one version byte, then one msgpack
array whose first item is the frame's tag. Batches (several envelopes, several
ack ids) travel in one frame because the number of socket calls, not the
encoding, is what costs.

Rule 1: ``decode`` either returns a frame or raises ``RemoteProtocolError``;
no input crashes it.
Rule 2: a frame with another version byte is refused, never guessed at.
"""

from __future__ import annotations

import msgspec

from ..errors import RemoteProtocolError
from ..message import Message
from .policy import RefusalReason, ReplyErrorKind

VERSION = 1
_VERSION_BYTE = bytes([VERSION])
_PER_MESSAGE_OVERHEAD = 64  # bytes an envelope adds to its body, about


class Hello(msgspec.Struct, array_like=True, tag=1, gc=False):
    """Heartbeat and advertisement; both sides send it every interval."""

    node: str
    session: str
    services: list[str] = []
    hosts_queues: bool = False
    load: int = 0


class Send(msgspec.Struct, array_like=True, tag=2, gc=False):
    """Producer → host: store these messages in ``queue``; confirm them."""

    queue: str
    messages: list[Message]


class Confirm(msgspec.Struct, array_like=True, tag=3, gc=False):
    """Host → producer: these ids are stored (or were already)."""

    ids: list[str]


class Refuse(msgspec.Struct, array_like=True, tag=4, gc=False):
    """Host → producer: these ids were not accepted: [id, reason, detail] each."""

    refusals: list[tuple[str, RefusalReason, str]]


class Consume(msgspec.Struct, array_like=True, tag=5, gc=False):
    """Worker → host: deliver ``queue`` to me, up to ``prefetch`` unsettled."""

    queue: str
    prefetch: int
    lease_ttl: float = 30.0
    max_attempts: int = 0


class Cancel(msgspec.Struct, array_like=True, tag=6, gc=False):
    """Worker → host: stop delivering ``queue``; unsettled ones go back."""

    queue: str


class Deliver(msgspec.Struct, array_like=True, tag=7, gc=False):
    """Host → worker: messages leased to this worker."""

    queue: str
    messages: list[Message]


class Settle(msgspec.Struct, array_like=True, tag=8, gc=False):
    """Worker → host: outcomes of deliveries, batched."""

    queue: str
    acks: list[str] = []
    nacks: list[tuple[str, float, str]] = []
    rejects: list[tuple[str, str]] = []
    extends: list[str] = []


class Request(msgspec.Struct, array_like=True, tag=9, gc=False):
    """Client → server: run ``service`` on ``message``; ``timeout`` is what is left."""

    request_id: str
    service: str
    message: Message
    timeout: float


class Reply(msgspec.Struct, array_like=True, tag=10, gc=False):
    """Server → client: the answer to ``request_id`` (or ``error``)."""

    request_id: str
    message: Message | None = None
    error: str = ""
    error_kind: ReplyErrorKind = ReplyErrorKind.NONE


class Error(msgspec.Struct, array_like=True, tag=11, gc=False):
    """Either way: the peer's last frame was refused, with why."""

    reason: str


class Verdict(msgspec.Struct, array_like=True, tag=13, gc=False):
    """Host → peer: the answer to a Consume (``allowed``), or, when the node's
    ACL changed, that a grant is gone. ``verb`` is an ``acl.Verb`` value."""

    verb: str
    name: str
    allowed: bool


class Batch(msgspec.Struct, array_like=True, tag=12, gc=False):
    """Several encoded frames for one peer, sent as one ZeroMQ message.

    Each item is a whole frame (version byte included); a Batch never holds
    another Batch.
    """

    frames: list[bytes]


Frame = (
    Hello
    | Send
    | Confirm
    | Refuse
    | Consume
    | Cancel
    | Deliver
    | Settle
    | Request
    | Reply
    | Error
    | Batch
    | Verdict
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode(frame: Frame) -> bytes:
    """Encode one frame, version byte first."""
    return _VERSION_BYTE + _encoder.encode(frame)


def encode_batch(encoded: list[bytes]) -> bytes:
    """Wrap already-encoded frames into one Batch frame."""
    return _VERSION_BYTE + _encoder.encode(Batch(encoded))


def chunks_by_size(messages: list[Message], limit: int) -> list[list[Message]]:
    """Split ``messages`` into runs whose bodies add up to about ``limit`` bytes
    at most (a body over it travels alone), so no frame outgrows what the
    peer's socket accepts. Never returns an empty run."""
    runs: list[list[Message]] = []
    start, size = 0, 0
    for index, message in enumerate(messages):
        size += len(message.body) + _PER_MESSAGE_OVERHEAD
        if size > limit and index > start:
            runs.append(messages[start:index])
            start, size = index, len(message.body) + _PER_MESSAGE_OVERHEAD
    if start < len(messages):
        runs.append(messages[start:])
    return runs


def decode_all(data: bytes | memoryview) -> list[Frame]:
    """Decode one ZeroMQ message: a frame, or the frames of a Batch.

    Raises:
        RemoteProtocolError: as :func:`decode`, or a Batch inside a Batch.
    """
    frame = decode(data)
    if not isinstance(frame, Batch):
        return [frame]
    inner = [decode(item) for item in frame.frames]
    if any(isinstance(f, Batch) for f in inner):
        raise RemoteProtocolError("a Batch frame may not hold another Batch")
    return inner


def decode(data: bytes | memoryview) -> Frame:
    """Decode one frame.

    Raises:
        RemoteProtocolError: empty input, another version, or a malformed frame.
    """
    if not data:
        raise RemoteProtocolError("empty frame")
    if data[0] != VERSION:
        raise RemoteProtocolError(
            f"unknown protocol version {data[0]} (this node speaks {VERSION})"
        )
    try:
        frame: Frame = _decoder.decode(memoryview(data)[1:])
        return frame
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"malformed frame: {exc}") from exc
