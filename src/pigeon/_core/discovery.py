"""Discovery: which nodes a connecting node keeps links to, decided from what
a source (a file of addresses, or DNS) said last.

A source is named by a URL, the ``discover=`` option of a ZeroMQ node::

    file:///etc/pigeon/nodes.txt   one tcp:// or ipc:// address a line; '#' comments
    dns://HOST:PORT                every A/AAAA address of HOST, at PORT
    srv://_pigeon._tcp.NAME        every target of NAME's SRV records, at its port

Rule 1: a read that fails, or that finds no address at all, changes
nothing: the last good set stays, and the failure is counted. A file caught
half-written or a DNS server that lost its zone must not take every link
away (to take a node away, list the others).
Rule 2: a good read replaces the set: addresses new to it are added, those
gone from it removed, the rest left alone. An address counts once; the
source's order is kept.
Rule 3: the addresses given to ``connect()`` are the caller's: the source
neither adds them a second time nor removes them.
Rule 4: a source is looked at every ``interval`` seconds. A file is parsed
only when its signature (inode, size, times) differs from the one last
read, so an unchanged file costs a stat, and a broken one is counted once,
not once a poll.
Rule 5: a lost link asks for an early look (a name may point elsewhere
now), but never sooner than ``MIN_GAP`` after the last one.
Rule 6: a part of a read that fails (one SRV target that does not resolve)
is counted; the read still counts if any address came of it.

Nothing here reads a clock or does I/O: the adapter passes ``now`` and what
it read.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import ConfigurationError

FILE_INTERVAL = 1.0  # seconds between looks at a file (a stat each)
DNS_INTERVAL = 10.0  # seconds between resolutions of a name
MIN_GAP = 1.0  # an early look (Rule 5) comes no sooner after the last one
DNS_PORT = 53
_SCHEMES = ("file", "dns", "srv")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


class SourceKind(enum.Enum):
    FILE = "file"
    DNS = "dns"
    SRV = "srv"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a node finds the others: ``target`` is a path (FILE), a host
    name (DNS, with ``port``) or an SRV name."""

    kind: SourceKind
    target: str
    port: int = 0
    interval: float = FILE_INTERVAL

    def __str__(self) -> str:
        if self.kind is SourceKind.DNS:
            return f"dns://{_host_text(self.target)}:{self.port}"
        return f"{self.kind.value}://{self.target}"


def parse_source(url: object, interval: float | None = None) -> Source:
    """The source ``url`` names, looked at every ``interval`` seconds (None:
    1 s for a file, 10 s for DNS).

    Raises:
        ConfigurationError: not one of the forms in the module docstring,
            or an interval that is not a positive number of seconds.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"discover= takes a URL string, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ConfigurationError(
            f"discover={url!r}: expected file://PATH, dns://HOST:PORT or srv://NAME"
        )
    kind = SourceKind(scheme)
    every = _interval(interval, FILE_INTERVAL if kind is SourceKind.FILE else DNS_INTERVAL)
    if kind is SourceKind.FILE:
        # Everything after file:// is the path: file:///etc/nodes.txt is
        # absolute, file://nodes.txt relative to the working directory.
        if not rest or "\x00" in rest:
            raise ConfigurationError(f"discover={url!r} names no file")
        return Source(kind, rest, interval=every)
    if kind is SourceKind.SRV:
        return Source(kind, _dns_name(rest.rstrip("."), url), interval=every)
    host, port = _host_port(rest, url, default_port=None)
    return Source(kind, host, port, interval=every)


def _interval(value: float | None, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86_400:
        raise ConfigurationError(
            f"discover_interval must be above 0 and at most 86400 seconds, not {value!r}"
        )
    return float(value)


def parse_nameserver(text: object) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[IPV6]:PORT`` of a DNS server to ask
    (an IP address; port 53 if none is given).

    Raises:
        ConfigurationError: anything else.
    """
    if not isinstance(text, str):
        raise ConfigurationError(f"nameserver= takes a str, not {type(text).__name__}")
    try:
        return str(ipaddress.ip_address(text)), DNS_PORT  # a bare address, IPv6 included
    except ValueError:
        pass
    host, port = _host_port(text, f"nameserver={text!r}", default_port=DNS_PORT)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ConfigurationError(
            f"nameserver={text!r}: give the server's IP address, not a name"
        ) from None


def _host_port(text: str, what: str, *, default_port: int | None) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{what}: {exc}") from None
    if parts.path or parts.query or parts.fragment or parts.username or not host:
        raise ConfigurationError(f"{what}: expected HOST:PORT")
    if port is None:
        if default_port is None:
            raise ConfigurationError(f"{what}: give the port the nodes listen on (HOST:PORT)")
        port = default_port
    if not 0 < port < 65536:
        raise ConfigurationError(f"{what}: port {port} is not 1 to 65535")
    if "[" not in text:
        host = _dns_name(host, what) if not _is_ip(host) else host
    elif not _is_ip(host):
        raise ConfigurationError(f"{what}: {host!r} in brackets is not an IPv6 address")
    return host, port


def _dns_name(name: str, what: str) -> str:
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ConfigurationError(f"{what}: {name!r} is not a DNS name")
    return name.lower()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def tcp_url(host: str, port: int) -> str:
    """The tcp:// address of ``host`` (a name or an IP address) at ``port``."""
    return f"tcp://{_host_text(host)}:{port}"


def is_ipv6(address: str) -> bool:
    """Whether ``address`` is a tcp:// address with an IPv6 literal (libzmq
    reaches those only on sockets with its IPV6 option)."""
    return address.startswith("tcp://[")


def check_address(text: str) -> str:
    """``text`` if it is an address a node can link to: ``tcp://HOST:PORT``
    (HOST a name, an IPv4 address or ``[IPv6]``) or ``ipc://PATH``.

    Raises:
        ConfigurationError: anything else.
    """
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "ipc" and rest and not any(c.isspace() for c in rest):
        return text
    if sep and scheme == "tcp":
        host, port = _host_port(rest, repr(text), default_port=None)
        return tcp_url(host, port)
    raise ConfigurationError(f"{text!r} is not a tcp://HOST:PORT or ipc://PATH address")


def parse_node_file(text: str) -> list[str]:
    """The addresses a node file lists: one per line; blank lines and from
    a '#' at the start of a line or after white space to its end are
    comments.

    Raises:
        ConfigurationError: a line that is not an address (named by number).
    """
    found: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        try:
            found.append(check_address(line))
        except ConfigurationError as exc:
            raise ConfigurationError(f"line {number}: {exc}") from None
    return found


@dataclass(slots=True)
class Change:
    """What a good read changed: links to open and links to close."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class Roster:
    """The addresses a source gave last, and what each read changes
    (Rules 1 to 3 and 6)."""

    def __init__(self, fixed: Iterable[str] = ()) -> None:
        self.fixed = frozenset(fixed)
        self.current: list[str] = []
        self.reads = 0  # good reads
        self.errors = 0  # failed reads, and failed parts of reads
        self.last_error = ""
        self._signature: Hashable = None

    def changed(self, signature: Hashable) -> bool:
        """Rule 4: whether a file with this signature needs reading; a
        signature, once asked about, is not read again."""
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    def failed(self, reason: str) -> None:
        """Rule 1: a read failed; nothing changes but the count."""
        self.errors += 1
        self.last_error = reason

    def found(self, addresses: Iterable[str], problems: Iterable[str] = ()) -> Change:
        """A read gave ``addresses`` (and ``problems``, parts of it that
        failed): what to add and remove (Rules 1 to 3 and 6)."""
        problems = list(problems)
        for problem in problems:
            self.failed(problem)
        found = list(dict.fromkeys(addresses))
        if not found:
            if not problems:  # (a failed part is counted already)
                self.failed("found no address")
            return Change()
        self.reads += 1
        new = [a for a in found if a not in self.fixed]
        before = set(self.current)
        change = Change(
            added=[a for a in new if a not in before],
            removed=[a for a in self.current if a not in set(new)],
        )
        self.current = new
        return change

    def forget(self, address: str, reason: str) -> None:
        """A link to ``address`` could not be opened: it is not in the set
        (the next good read that lists it tries again), and that is counted."""
        if address in self.current:
            self.current.remove(address)
        self.failed(f"{address}: {reason}")


class Schedule:
    """When to look at the source next (Rules 4 and 5)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = float("-inf")  # the first look is at once
        self.last_at = float("-inf")

    def wait(self, now: float) -> float:
        """Seconds until the next look is due (0: now)."""
        return max(0.0, self.next_at - now)

    def looked(self, now: float) -> None:
        self.last_at = now
        self.next_at = now + self.interval

    def hurry(self, now: float) -> None:
        """Rule 5: a link was lost; look soon."""
        self.next_at = min(self.next_at, max(now, self.last_at + MIN_GAP))
