#!/usr/bin/env python
"""Write docs/protocol-vectors.json: each frame type as hex, with its
decoded fields, for peers written in other languages. Deterministic: run it
again and the file does not change (tests/test_protocol_vectors.py checks
pigeon's encoder and decoder against it).

    python scripts/protocol_vectors.py [OUT]
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from pigeon._core import frames
from pigeon._core.policy import RefusalReason, ReplyErrorKind
from pigeon.message import Message

OUT = Path(__file__).resolve().parent.parent / "docs" / "protocol-vectors.json"


def _message(mid: str, body: bytes, **fields: Any) -> Message:
    return Message(
        id=mid,
        body=body,
        content_type=fields.pop("content_type", "text/plain; charset=utf-8"),
        headers=fields.pop("headers", {}),
        attempt=fields.pop("attempt", 0),
        redelivered=fields.pop("redelivered", False),
        created_at=fields.pop("created_at", 1700000000.25),
        deadline=fields.pop("deadline", None),
    )


def vectors() -> list[tuple[str, frames.Frame]]:
    """(name, frame) pairs: every frame type, with and without optional fields."""
    hello = frames.Hello("node-1", "session-1", ["upper"], True, 2, True, 1.0)
    consume = frames.Consume("words", 10, 30.0, 0)
    return [
        ("Hello", hello),
        ("Hello (every optional field at its default)", frames.Hello("n", "s")),
        (
            "Send",
            frames.Send("words", [_message("m-1", b"hello", headers={"k": "v"})]),
        ),
        ("Confirm", frames.Confirm(["m-1", "m-2"])),
        (
            "Refuse",
            frames.Refuse([("m-3", RefusalReason.FULL, "queue 'words'")]),
        ),
        ("Consume", consume),
        ("Cancel", frames.Cancel("words", True)),
        (
            "Deliver",
            frames.Deliver(
                "words",
                [_message("m-1", b"hello", attempt=2, redelivered=True, deadline=1700000060.5)],
            ),
        ),
        (
            "Settle",
            frames.Settle("words", ["m-1"], [("m-2", 0.5, "busy")], [("m-3", "bad")], ["m-4"]),
        ),
        (
            "Request",
            frames.Request("r-1", "upper", _message("r-1", b"hi", content_type="text/plain"), 4.5),
        ),
        ("Reply", frames.Reply("r-1", _message("r-1", b"HI"))),
        ("Reply (an error)", frames.Reply("r-1", None, "boom", ReplyErrorKind.REJECTED)),
        ("Error", frames.Error("malformed frame: expected array")),
        ("Error (naming a queue and ids)", frames.Error("stale settles", "words", ["m-9"])),
        (
            "Batch",
            frames.Batch([frames.encode(frames.Confirm(["m-1"])), frames.encode(consume)]),
        ),
        ("Verdict", frames.Verdict("consume", "words", True, 10, 30.0)),
        (
            "Verdict (a refused Subscribe whose replay is trimmed)",
            frames.Verdict(
                "consume",
                "pigeon.tmp.s-1.1",
                False,
                reason="topic 'prices.eur' no longer retains sequence number 1; "
                "the first retained is 3",
                trimmed_topic="prices.eur",
                first_retained=3,
            ),
        ),
        ("Subscribe", frames.Subscribe("pigeon.tmp.s-1.1", "prices.>", "drop-oldest", 100)),
        (
            "Subscribe (durable, starting at the last 10)",
            frames.Subscribe("pigeon.sub.audit", "orders.*", "block", 1000, last=10),
        ),
    ]


def _plain(value: Any) -> Any:
    """Decoded fields as JSON can hold them: a struct (a frame, an envelope)
    as its fields by name, bytes as {"bin": hex}, enums as their value."""
    if isinstance(value, msgspec.Struct):
        return {name: _plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def fields(frame: frames.Frame) -> dict[str, Any]:
    """The frame's tag and fields by name, as JSON can hold them."""
    return {"tag": type(frame).__struct_config__.tag, **_plain(frame)}


# Frames as an older or terser peer may send them: trailing optional fields
# left out. Decode-only: pigeon itself always writes every field.
SHORT = [
    ("Hello of a 0.1 peer (no knows_you, no heartbeat)", frames.Hello("n", "s", [], False, 0)),
    ("Consume with only queue and prefetch", frames.Consume("words", 5)),
    ("Error with only a reason", frames.Error("bad frame")),
]


def _short_hex(frame: frames.Frame, count: int) -> str:
    """``frame`` encoded with only its first ``count`` fields."""
    items = [type(frame).__struct_config__.tag]
    items += [getattr(frame, name) for name in frame.__struct_fields__[:count]]
    return (bytes([frames.VERSION]) + msgspec.msgpack.encode(items)).hex()


def document() -> dict[str, Any]:
    return {
        "about": (
            "pigeon wire protocol version 1 test vectors (docs/protocol.md). 'hex' is one "
            "ZeroMQ frame: the version byte 0x01, then a msgpack array [tag, fields...]. "
            "Fields are listed by name in order; bin values are given as {'bin': hex}. "
            "Generated by scripts/protocol_vectors.py."
        ),
        "version": frames.VERSION,
        "vectors": [
            {
                "name": name,
                "frame": type(frame).__name__,
                "hex": frames.encode(frame).hex(),
                "fields": fields(frame),
            }
            for name, frame in vectors()
        ],
        "decode_only": [
            {
                "name": name,
                "frame": type(frame).__name__,
                "hex": _short_hex(frame, count),
                "fields": fields(frame),
            }
            for (name, frame), count in zip(SHORT, (5, 2, 1), strict=True)
        ],
    }


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.write_text(json.dumps(document(), indent=2, sort_keys=False) + "\n")


if __name__ == "__main__":
    main(sys.argv)
