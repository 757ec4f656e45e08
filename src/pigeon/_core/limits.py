"""Every bound on what a peer may send, in one place.

The wire decoder refuses a frame with any field outside these bounds (as a
malformed frame), and the API refuses the same values before anything is
sent, so a bound is never met for the first time at a remote node. The
reasons are in docs/protocol.md; the node-level budgets (queue count, reply
cache, memory) are in ``QueuePolicy`` and the node's options.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_NAME = 255  # characters in a queue, service or topic name
# A name is dot-separated segments of anything but white space, control
# characters, the wildcards and the dot itself (brokers refuse the rest).
NAME_RE = r"^[^\s\x00-\x1f\x7f*>.]+(\.[^\s\x00-\x1f\x7f*>.]+)*$"
_NAME = re.compile(NAME_RE)
MAX_ID = 255  # characters in a message or request id
MAX_HEADERS = 64  # headers per message
MAX_HEADER_NAME = 255  # characters
MAX_HEADER_VALUE = 8192  # characters
MAX_TEXT = 8192  # characters of a reason, error or detail
MAX_ATTEMPT = 2**31 - 1
MAX_TIME = 1e11  # wall-clock seconds (the year 5138): a timestamp beyond is garbage
MAX_SECONDS = 1e9  # a duration (timeout, lease, delay) beyond is garbage
MAX_FRAME_ITEMS = 10_000  # messages, ids or settles in one frame
MAX_BATCH_FRAMES = 1024  # frames in one Batch
MAX_SERVICES = 1024  # services one node may advertise
MAX_PREFETCH = 100_000  # what a consumer may ask; the host clamps lower
DEFAULT_MAX_PREFETCH = 1000
MAX_QUEUES_PER_PEER = 1000  # queues one peer may consume on a node at once
DEFAULT_MAX_LEASE_TTL = 3600.0
DEFAULT_INITIAL_CREDIT = 32  # deliveries a new consumer may hold before it settles any
DEFAULT_MAX_DELAY = 30 * 86_400.0  # seconds a not-before time may hold a message (a month)


def check_name(name: object, what: str) -> str:
    """``name`` if it is a valid queue or service name.

    Raises:
        TypeError: not a str.
        ValueError: empty, too long, or with a character names may not hold.
    """
    if not isinstance(name, str):
        raise TypeError(f"a {what} name must be a str, not {type(name).__name__}")
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise ValueError(f"a {what} name is 1 to {MAX_NAME} bytes, not {len(name)}: {name!r}")
    if not _NAME.match(name):
        raise ValueError(
            f"{what} name {name!r}: dot-separated non-empty segments without white space, "
            "control characters, '*' or '>'"
        )
    return name


def message_size(body: bytes, headers: dict[str, str]) -> int:
    """What a message counts against a size limit: its body and its headers
    (the characters of their names and values)."""
    if not headers:
        return len(body)
    # The length of a join is the sum of the lengths, without a generator.
    return len(body) + len(_join(headers)) + len(_join(headers.values()))


_join = "".join


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """What a host decides for the queues it holds; consumers ask, the host clamps.

    Rule 1: a consumer's prefetch is clamped to ``1..max_prefetch`` and its
    lease to ``min_lease_ttl..max_lease_ttl`` (no lease, or one that is not
    a finite number, gets ``lease_ttl``); the consumer is told what it got.
    Rule 2: ``max_attempts`` is the host's: no consumer changes it. 0 means
    the host sets no limit (each worker's ``RetryPolicy`` still applies to
    what it receives).
    Rule 3: a consumer starts with ``initial_credit`` deliveries in flight
    and earns the rest of its prefetch by settling (the ledger's Rule 6), so
    one that never settles holds a few messages, not a prefetch's worth.
    Rule 4: a send is refused (``full``) once the queue holds ``max_length``
    ready messages or ``max_bytes`` bytes (ready, delayed, in flight and on
    disk); None is no bound.
    """

    lease_ttl: float = 30.0
    min_lease_ttl: float = 0.05
    max_lease_ttl: float = DEFAULT_MAX_LEASE_TTL
    max_prefetch: int = DEFAULT_MAX_PREFETCH
    max_attempts: int = 0
    initial_credit: int = DEFAULT_INITIAL_CREDIT
    max_length: int | None = None
    max_bytes: int | None = None
    max_delay: float = DEFAULT_MAX_DELAY  # the longest a not-before time holds a message

    def room(self, ready: int, held_bytes: int, count: int, sizes: Iterable[int]) -> int:
        """How many of ``count`` sends (``sizes`` in order, read only for a
        ``max_bytes`` bound) Rule 4 lets into a queue that holds ``ready``
        ready messages and ``held_bytes`` bytes; the send that crosses
        ``max_bytes`` is still taken."""
        room = count
        if self.max_length is not None:
            room = max(0, min(room, self.max_length - ready))
        if self.max_bytes is not None:
            free, taken = self.max_bytes - held_bytes, 0
            for size in sizes:
                if taken >= room or free <= 0:
                    break
                free -= size
                taken += 1
            room = taken
        return room

    def prefetch(self, asked: int) -> int:
        return max(1, min(int(asked), self.max_prefetch))

    def lease(self, asked: float | None) -> float:
        if asked is None or not math.isfinite(asked) or asked <= 0:
            return self.lease_ttl
        return max(self.min_lease_ttl, min(float(asked), self.max_lease_ttl))
