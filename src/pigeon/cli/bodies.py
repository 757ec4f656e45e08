"""Message bodies on the command line: where a command's body comes from
(an argument, a file, stdin), what it is sent as, and how a received body
is shown (text, raw bytes, or JSON with base64 for what is not text)."""

from __future__ import annotations

import base64
import sys
from typing import IO, Any

import click
import msgspec

from ..message import BYTES, JSON, MSGPACK, TEXT, Message

# More than any transport carries (ZeroMQ's default limit is 4 MiB): a body
# read from a file or stdin stops here instead of filling memory, and the
# transport names its own, lower, limit.
MAX_INPUT = 64 << 20

CONTENT_TYPES = {"text": TEXT, "json": JSON, "msgpack": MSGPACK, "bytes": BYTES}


def read_body(body: str | None, file: str | None) -> bytes | str:
    """The body a command sends: ``body`` itself, the file ``file``, or stdin
    (``body`` or ``file`` is ``-``, or neither is given and stdin is not a
    terminal).

    Raises:
        click.UsageError: both given, or neither with stdin a terminal.
    """
    if body is not None and file is not None:
        raise click.UsageError("give BODY or --file PATH, not both")
    if file is not None and file != "-":
        with open(file, "rb") as f:
            return _read(f, file)
    if file == "-" or body == "-" or (body is None and not sys.stdin.isatty()):
        return _read(sys.stdin.buffer, "stdin")
    if body is None:
        raise click.UsageError("no body: give BODY, --file PATH, or pipe it on stdin")
    return body


def _read(source: IO[bytes], what: str) -> bytes:
    data = source.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise click.UsageError(f"the body in {what} is over {MAX_INPUT} bytes")
    return data


def payload(raw: bytes | str, content_type: str | None) -> tuple[Any, str | None]:
    """What to hand ``send``/``publish``/``request`` for ``raw``: text when it
    is UTF-8 and no content type is asked for, else bytes; with a content
    type, the body checked against it (JSON and msgpack are parsed, so a
    malformed body is refused here rather than by the receiver).

    Raises:
        click.BadParameter: the body does not fit the content type, or the
            content type is not one pigeon knows.
    """
    if content_type is None:
        if isinstance(raw, str):
            return raw, None
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            return raw, None
    wanted = CONTENT_TYPES.get(content_type, content_type)
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        if wanted == TEXT:
            return data.decode("utf-8"), TEXT
        if wanted == BYTES:
            return data, BYTES
        if wanted == JSON:
            return msgspec.json.decode(data), JSON
        if wanted == MSGPACK:
            return msgspec.msgpack.decode(data), MSGPACK
    except (UnicodeDecodeError, msgspec.DecodeError) as exc:
        raise click.BadParameter(
            f"the body is not {wanted}: {exc}", param_hint="'--content-type'"
        ) from None
    names = ", ".join(f"{short} ({full})" for short, full in CONTENT_TYPES.items())
    raise click.BadParameter(
        f"unknown content type {content_type!r}; expected one of {names}",
        param_hint="'--content-type'",
    )


def parse_headers(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``--header K=V`` (repeatable) as a dict; a click callback."""
    found: dict[str, str] = {}
    for item in values:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise click.BadParameter(f"expected NAME=VALUE, not {item!r}", ctx, param)
        found[name] = value
    return found


def as_text(body: bytes) -> str:
    """A body for a terminal: its text, with what is not UTF-8 escaped."""
    return body.decode("utf-8", errors="backslashreplace")


def as_json(message: Message) -> dict[str, Any]:
    """A message's body, content type and headers for a JSON line: the body
    as text when it is UTF-8, else base64 (``encoding`` says which)."""
    try:
        body, encoding = message.body.decode("utf-8"), "text"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(message.body).decode("ascii"), "base64"
    return {
        "body": body,
        "encoding": encoding,
        "content_type": message.content_type,
        "headers": dict(message.headers),
    }
