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

from typing import Annotated

import msgspec

from ..errors import RemoteProtocolError
from ..message import Message
from . import limits as L
from .policy import RefusalReason, ReplyErrorKind

# Field bounds (``limits``): a decoded frame with a field outside them is
# malformed (Rule 1), so nothing past here meets an absurd value.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=L.MAX_NAME, pattern=L.NAME_RE)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=L.MAX_ID)]
Text = Annotated[str, msgspec.Meta(max_length=L.MAX_TEXT)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=L.MAX_SECONDS)]
Count = Annotated[int, msgspec.Meta(ge=0, le=L.MAX_ATTEMPT)]
Messages = Annotated[list[Message], msgspec.Meta(max_length=L.MAX_FRAME_ITEMS)]
Ids = Annotated[list[Id], msgspec.Meta(max_length=L.MAX_FRAME_ITEMS)]
# A queue named by an Error: empty when it concerns none.
QueueField = Annotated[str, msgspec.Meta(max_length=L.MAX_NAME)]

VERSION = 1
_VERSION_BYTE = bytes([VERSION])
_PER_MESSAGE_OVERHEAD = 64  # bytes an envelope adds to its body, about


class Hello(msgspec.Struct, array_like=True, tag=1, gc=False):
    """Heartbeat and advertisement; both sides send it every interval."""

    node: Id
    session: Id
    services: Annotated[list[Name], msgspec.Meta(max_length=L.MAX_SERVICES)] = []
    hosts_queues: bool = False
    load: Count = 0
    # False in a host's Hello to a peer it does not know (new, or given up
    # on after missed heartbeats): the peer registers its consumers again.
    knows_you: bool = True
    # Seconds between this node's Hellos (0: not said, as from peers of 0.1):
    # the other side's liveness rule allows for it (_core.liveness Rule 3).
    heartbeat: Seconds = 0.0


class Send(msgspec.Struct, array_like=True, tag=2, gc=False):
    """Producer → host: store these messages in ``queue``; confirm them."""

    queue: Name
    messages: Messages


class Confirm(msgspec.Struct, array_like=True, tag=3, gc=False):
    """Host → producer: these ids are stored (or were already)."""

    ids: Ids


class Refuse(msgspec.Struct, array_like=True, tag=4, gc=False):
    """Host → producer: these ids were not accepted: [id, reason, detail] each."""

    refusals: Annotated[
        list[tuple[Id, RefusalReason, Text]], msgspec.Meta(max_length=L.MAX_FRAME_ITEMS)
    ]


class Consume(msgspec.Struct, array_like=True, tag=5, gc=False):
    """Worker → host: deliver ``queue`` to me, up to ``prefetch`` unsettled."""

    queue: Name
    prefetch: Annotated[int, msgspec.Meta(ge=1, le=L.MAX_PREFETCH)]
    lease_ttl: Seconds = 30.0
    max_attempts: Count = 0  # the worker's own limit; the host keeps its own


class Cancel(msgspec.Struct, array_like=True, tag=6, gc=False):
    """Worker → host: stop delivering ``queue``; unsettled ones go back, or,
    with ``keep_leases`` (a worker draining), stay with the worker, which
    settles them itself."""

    queue: Name
    keep_leases: bool = False


class Deliver(msgspec.Struct, array_like=True, tag=7, gc=False):
    """Host → worker: messages leased to this worker."""

    queue: Name
    messages: Messages


class Settle(msgspec.Struct, array_like=True, tag=8, gc=False):
    """Worker → host: outcomes of deliveries, batched."""

    queue: Name
    acks: Ids = []
    nacks: Annotated[
        list[tuple[Id, Seconds, Text]], msgspec.Meta(max_length=L.MAX_FRAME_ITEMS)
    ] = []
    rejects: Annotated[list[tuple[Id, Text]], msgspec.Meta(max_length=L.MAX_FRAME_ITEMS)] = []
    extends: Ids = []


class Request(msgspec.Struct, array_like=True, tag=9, gc=False):
    """Client → server: run ``service`` on ``message``; ``timeout`` is what is left."""

    request_id: Id
    service: Name
    message: Message
    timeout: Seconds


class Reply(msgspec.Struct, array_like=True, tag=10, gc=False):
    """Server → client: the answer to ``request_id`` (or ``error``)."""

    request_id: Id
    message: Message | None = None
    error: Text = ""
    error_kind: ReplyErrorKind = ReplyErrorKind.NONE


class Error(msgspec.Struct, array_like=True, tag=11, gc=False):
    """Either way: the peer's last frame was refused, with why, and the queue
    and ids it concerned when it named any (e.g. settles for leases this
    host does not hold)."""

    reason: Text
    queue: QueueField = ""
    ids: Ids = []


class Verdict(msgspec.Struct, array_like=True, tag=13, gc=False):
    """Host → peer: the answer to a Consume (``allowed``), or, when the node's
    ACL changed, that a grant is gone. ``verb`` is an ``acl.Verb`` value."""

    verb: Annotated[str, msgspec.Meta(max_length=16)]
    name: Name
    allowed: bool
    prefetch: Count = 0  # what the host granted (0: refused)
    lease_ttl: Seconds = 0.0
    reason: Text = ""  # why not, when it is not the ACL (e.g. the queue cap)
    # A Subscribe refused because its replay is trimmed: the topic, and the
    # first number it still retains (0: not that).
    trimmed_topic: QueueField = ""
    first_retained: Annotated[int, msgspec.Meta(ge=0, le=2**62)] = 0


class Subscribe(msgspec.Struct, array_like=True, tag=14, gc=False):
    """Subscriber → topic host: make (or join) the subscription ``queue``
    bound to ``pattern``; a Consume of ``queue`` follows on the same link,
    and its Verdict answers both. ``queue`` is ``pigeon.sub.NAME`` for a
    durable subscription, else a name the subscriber made unique
    (``pigeon.tmp.…``). The start fields ask for retained history (at most
    one is set); a subscription that exists keeps its position instead."""

    queue: Name
    pattern: Annotated[str, msgspec.Meta(min_length=1, max_length=L.MAX_NAME)]
    policy: Annotated[str, msgspec.Meta(max_length=16)] = "drop-oldest"
    buffer: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    from_seq: Annotated[int, msgspec.Meta(ge=1, le=2**62)] | None = None
    from_time: Annotated[float, msgspec.Meta(ge=0.0, le=1e11)] | None = None
    last: Annotated[int, msgspec.Meta(ge=1, le=2**62)] | None = None
    last_per_subject: bool = False


class Batch(msgspec.Struct, array_like=True, tag=12, gc=False):
    """Several encoded frames for one peer, sent as one ZeroMQ message.

    Each item is a whole frame (version byte included); a Batch never holds
    another Batch.
    """

    frames: Annotated[list[bytes], msgspec.Meta(max_length=L.MAX_BATCH_FRAMES)]


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
    | Subscribe
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
    at most (a body over it travels alone), and of at most
    ``MAX_FRAME_ITEMS`` messages, so no frame outgrows what the peer's socket
    and decoder accept. Never returns an empty run."""
    runs: list[list[Message]] = []
    start, size = 0, 0
    for index, message in enumerate(messages):
        size += len(message.body) + _PER_MESSAGE_OVERHEAD
        if (size > limit or index - start >= L.MAX_FRAME_ITEMS) and index > start:
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
