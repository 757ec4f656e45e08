"""Decisions of the bridges to plain ZeroMQ peers (``pigeon.bridge``), sans-IO.

Three things live here, none of which touches a socket or a clock:

- **Specs.** ``parse_spec(kind, text)`` turns ``--pull URL=QUEUE``,
  ``--push URL=QUEUE``, ``--rep SERVICE=URL[,URL...]`` and
  ``--req URL=SERVICE`` into a :class:`BridgeSpec`, or raises
  :class:`~pigeon.errors.ConfigurationError` naming what is wrong.
- **Plain frames.** ``plain_body(frames)`` says whether what a plain peer
  sent is a message: exactly one non-empty frame (its body).
- **Lazy pirate** (zguide ch. 4). :class:`LazyPirate` picks the plain REP
  server for each attempt of a call and says, after a timeout, whether to
  try again and where.

Rules:

1. A URL may carry ``bind:`` or ``connect:``; without one, the kind's
   default holds (pull, rep connect; push, req bind), the side the seed's
   own peers leave open.
2. A plain message is one frame, not empty. Anything else is malformed:
   counted and dropped, never passed on and never a crash.
3. Calls rotate over the REP servers, so every live one gets work; a server
   that timed out is skipped for ``cooldown`` seconds unless every server
   is cooling down, then the one that failed longest ago is tried.
4. A call is tried at most ``attempts`` times, and never past its deadline.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import ConfigurationError
from .limits import check_name


class Kind(enum.Enum):
    """The four bridges, by the plain socket they face."""

    PULL = "pull"  # a plain PUSH peer feeds a queue
    PUSH = "push"  # a queue feeds plain PULL peers
    REP = "rep"  # a service is answered by plain REP servers
    REQ = "req"  # plain REQ clients call a service


# Rule 1: the side the seed's peers leave open.
BINDS_BY_DEFAULT = {Kind.PULL: False, Kind.PUSH: True, Kind.REP: False, Kind.REQ: True}
USAGE = {
    Kind.PULL: "URL=QUEUE",
    Kind.PUSH: "URL=QUEUE",
    Kind.REP: "SERVICE=URL[,URL...]",
    Kind.REQ: "URL=SERVICE",
}
SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclass(frozen=True)
class Endpoint:
    """A plain peer's address and whether the bridge binds or connects it."""

    url: str
    bind: bool

    def __str__(self) -> str:
        return f"{'bind' if self.bind else 'connect'}:{self.url}"


@dataclass(frozen=True)
class BridgeSpec:
    """One bridge: its kind, the pigeon name (queue or service), its plain endpoints."""

    kind: Kind
    name: str
    endpoints: tuple[Endpoint, ...]

    def __str__(self) -> str:
        urls = ",".join(str(e) for e in self.endpoints)
        if self.kind is Kind.REP:
            return f"{self.kind.value} {self.name}={urls}"
        return f"{self.kind.value} {urls}={self.name}"


def parse_endpoint(text: str, *, bind_by_default: bool, what: str = "URL") -> Endpoint:
    """``[bind:|connect:]URL`` as an :class:`Endpoint`.

    Raises:
        ConfigurationError: no URL, or a scheme ZeroMQ does not speak.
    """
    bind = bind_by_default
    for prefix, binds in (("bind:", True), ("connect:", False)):
        if text.startswith(prefix):
            text, bind = text[len(prefix) :], binds
            break
    if not text.startswith(SCHEMES) or text.partition("://")[2] == "":
        raise ConfigurationError(
            f"{what} {text!r} is not a ZeroMQ address "
            f"({', '.join(s + '…' for s in SCHEMES)}, optionally after bind: or connect:)"
        )
    return Endpoint(text, bind)


def parse_spec(kind: Kind, text: str) -> BridgeSpec:
    """Parse one bridge's command-line spec (see the module docstring).

    Raises:
        ConfigurationError: the spec is not ``USAGE[kind]``, its name is not a
            valid queue or service name, or a URL is not a ZeroMQ address.
    """
    usage = f"--{kind.value} takes {USAGE[kind]}, not {text!r}"
    # URLs hold no '=' in practice; the name side never does. Split on the
    # '=' that separates them: the last for URL=NAME, the first for NAME=URLs.
    if kind is Kind.REP:
        name, sep, urls = text.partition("=")
        raw = urls.split(",")
    else:
        urls, sep, name = text.rpartition("=")
        raw = [urls]
    if not sep or not name or any(not u for u in raw):
        raise ConfigurationError(usage)
    what = "queue" if kind in (Kind.PULL, Kind.PUSH) else "service"
    try:
        check_name(name, what)
    except ValueError as exc:
        raise ConfigurationError(f"{usage}: {exc}") from exc
    endpoints = tuple(
        parse_endpoint(u, bind_by_default=BINDS_BY_DEFAULT[kind], what=f"--{kind.value} URL")
        for u in raw
    )
    return BridgeSpec(kind, name, endpoints)


class Malformed(enum.Enum):
    """Why a plain peer's message was not passed on (Rule 2)."""

    MULTIPART = "multipart"
    EMPTY = "empty"


def plain_body(frames: list[bytes]) -> bytes | Malformed:
    """The body of a plain message, or why it is not one (Rule 2)."""
    if len(frames) != 1:
        return Malformed.MULTIPART if frames else Malformed.EMPTY
    if not frames[0]:
        return Malformed.EMPTY
    return frames[0]


class LazyPirate:
    """Where each attempt of a call to plain REP servers goes (Rules 3 and 4).

    The adapter asks :meth:`choose` before each attempt, reports
    :meth:`answered` or :meth:`timed_out`, and asks :meth:`retry` whether a
    timed-out call goes on. ``now`` is any monotonic clock, in seconds.
    """

    def __init__(self, servers: int, *, attempts: int = 3, cooldown: float = 5.0) -> None:
        if servers < 1:
            raise ConfigurationError("a lazy pirate needs at least one server")
        if attempts < 1:
            raise ConfigurationError(f"attempts must be >= 1, not {attempts}")
        self.servers = servers
        self.attempts = attempts
        self.cooldown = cooldown
        self._next = 0
        self._failed_at: list[float | None] = [None] * servers

    def choose(self, now: float) -> int:
        """The server for the next attempt: the next in turn that is not
        cooling down, else the one that failed longest ago."""
        for step in range(self.servers):
            index = (self._next + step) % self.servers
            failed = self._failed_at[index]
            if failed is None or now - failed >= self.cooldown:
                self._next = index + 1
                return index
        index = min(range(self.servers), key=lambda i: self._failed_at[i] or 0.0)
        self._next = index + 1
        return index

    def answered(self, index: int) -> None:
        self._failed_at[index] = None

    def timed_out(self, index: int, now: float) -> None:
        self._failed_at[index] = now

    def retry(self, attempt: int, now: float, deadline: float | None) -> bool:
        """After attempt number ``attempt`` (1-based) failed: try again?"""
        return attempt < self.attempts and (deadline is None or now < deadline)

    def cooling(self, now: float) -> int:
        """How many servers are skipped for now (for stats)."""
        return sum(1 for f in self._failed_at if f is not None and now - f < self.cooldown)
