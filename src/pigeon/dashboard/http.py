"""HTTP/1.1 for the dashboard, without I/O: parse a request head, make a
response. The server reads bytes and calls these; it decides nothing here.

Rules:
1. A head is at most ``Limits.head_bytes`` and ``Limits.headers`` fields;
   past either the request is refused (431), never buffered further.
2. A body is sized by ``Content-Length`` only (no chunked uploads: 411 or
   501), at most ``Limits.body_bytes`` (413).
3. Every response closes the connection: one request per connection keeps
   the server free of keep-alive state and a slow client holds one slot for
   one request only.
4. Every response forbids caching, sniffing, framing and scripts from
   anywhere but the dashboard itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

METHODS = frozenset({"GET", "HEAD", "POST"})
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
# Rule 4. The page loads its script and style from /static only.
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
)


@dataclass(frozen=True)
class Limits:
    """How much of a request the server reads at most."""

    head_bytes: int = 16 << 10
    headers: int = 48
    body_bytes: int = 4 << 10


DEFAULT_LIMITS = Limits()


class HttpError(Exception):
    """A request the dashboard refuses, with the status that says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Request:
    """One parsed request head (names of headers lowercased)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        """The body as JSON (400 when it is not)."""
        if (self.header("content-type") or "").split(";")[0].strip() != "application/json":
            raise HttpError(415, "the body must be application/json")
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"the body is not JSON: {exc}") from None


# Headers a request may carry once only: two values would be read
# differently by different parts (request smuggling, origin confusion).
_SINGLE = frozenset({"host", "content-length", "origin", "x-pigeon-token", "content-type"})


def parse_head(head: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
    """The request that ``head`` (up to and without the blank line) starts.

    Raises:
        HttpError: the head is malformed or over a limit (rules 1 and 2).
    """
    if len(head) > limits.head_bytes:
        raise HttpError(431, f"the request head is over {limits.head_bytes} bytes")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "the request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "expected METHOD TARGET HTTP/1.x")
    method, target, _ = parts
    if method not in METHODS:
        raise HttpError(405, f"{method} is not served here")
    if not target.startswith("/"):
        raise HttpError(400, "the target must be a path")
    if len(lines) - 1 > limits.headers:
        raise HttpError(431, f"more than {limits.headers} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(400, "a header field is malformed")
        name = name.lower()
        if name in headers:
            if name in _SINGLE:
                raise HttpError(400, f"{name} is given twice")
            headers[name] += ", " + value.strip()
        else:
            headers[name] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked or encoded bodies are not accepted")
    split = urlsplit(target)
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    return Request(method, split.path, query, headers)


def body_length(request: Request, limits: Limits = DEFAULT_LIMITS) -> int:
    """How many body bytes follow the head (rule 2).

    Raises:
        HttpError: the length is missing on a POST, malformed or too large.
    """
    given = request.header("content-length")
    if given is None:
        if request.method == "POST":
            raise HttpError(411, "a POST needs a Content-Length")
        return 0
    if not given.isdigit():
        raise HttpError(400, "Content-Length is not a number")
    length = int(given)
    if length > limits.body_bytes:
        raise HttpError(413, f"the body is over {limits.body_bytes} bytes")
    return length


def response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
) -> bytes:
    """A whole response that closes the connection (rules 3 and 4)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in SECURITY_HEADERS)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body


def json_response(status: int, value: Any, *, head_only: bool = False) -> bytes:
    """``value`` as a JSON response."""
    body = json.dumps(value, separators=(",", ":")).encode()
    return response(status, body, "application/json", head_only=head_only)
