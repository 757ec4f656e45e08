"""The options of a ZeroMQ node, checked in one place."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..._core.discovery import Source, SourceKind, parse_nameserver, parse_source
from ..._core.limits import (
    DEFAULT_MAX_LEASE_TTL,
    DEFAULT_MAX_PREFETCH,
    MAX_FRAME_ITEMS,
    MAX_SECONDS,
    QueuePolicy,
)
from ..._core.queue_policies import QueuePolicies
from ...errors import ConfigurationError
from ..queue_table import DEFAULT_MAX_MEMORY
from .queue_file import load_queue_policies

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    """What ``pigeon.connect(..., **options)`` takes for a ZeroMQ node.

    Attributes:
        heartbeat: seconds between heartbeats; a peer is dead after
            ``heartbeat_misses`` of them pass in silence.
        max_message_size: largest message accepted (body and headers), in bytes.
        outbox_limit: sends awaiting confirmation per link before ``send``
            raises :class:`~pigeon.errors.Backpressure`.
        connect_grace: how long a request waits for a new link's handshake
            before deciding that nobody offers the service.
        lease_ttl, max_attempts, max_prefetch, max_lease_ttl: the policy of
            the queues this node hosts (``QueuePolicy``): consumers ask for a
            prefetch and a lease and get them clamped to these bounds; the
            attempt limit (0: none) is the host's alone.
        max_length: ready messages one queue may hold (None: no bound).
        queues: per-queue policies: a TOML file of ``[queue."NAME"]`` tables
            (names or patterns), or the same as a mapping; each overrides
            the node-wide policy above for the queues it names (see
            ``pigeon.transports.zmq.queue_file``).
        max_queues: queues this node holds at most; at the cap idle ones are
            forgotten, then new ones refused.
        max_memory: the memory alarm, in bytes of message bodies held (None:
            off; default 128 MiB): past it, sends to the queues holding the
            most are refused and producers see ``Backpressure`` until
            consumers catch up; past twice it, every send. Nothing is dropped.
        store: path of a SQLite file: the queues this node hosts become
            durable. Needs ``bind``.
        synchronous: ``"full"`` (default: every confirm is fsynced) or ``"normal"``.
        min_free_disk: bytes that must stay free on the filesystem of
            ``store``; below it new messages are refused with ``StoreError``
            (docs/durability.md). None: the store's default, 64 MiB; 0: off.
        salvage: open a damaged ``store`` anyway, keeping every row that
            checks out and quarantining the rest (docs/durability.md).
        attempt_timeout: seconds after which a call whose server has not
            answered is also sent to another server, with the same request id.
        outbox: path of a SQLite file that makes this producer's outbox
            durable (see docs/durability.md).
        key: this node's ``.key_secret`` file (or ``PIGEON_KEY``): CURVE on
            every tcp and ipc link.
        server_key: the public key (``.key`` file or Z85 text) of the nodes
            this one connects to (or ``PIGEON_SERVER_KEY``).
        allow: an ACL file: the client keys a binding node lets in, and what
            each may do (see docs/security.md).
        insecure: let a node bind an address other machines reach without keys.
        discover: where to find the nodes to link to, besides the URLs given:
            ``file://PATH`` (a file of addresses, one a line, read again when
            it changes), ``dns://HOST:PORT`` (every A/AAAA address of HOST)
            or ``srv://NAME`` (SRV records; needs the ``dns`` extra). Links
            are added and closed as the set changes (docs/discovery.md).
        discover_interval: seconds between looks at the source (default 1
            for a file, 10 for DNS).
        nameserver: the DNS server ``srv://`` asks (``HOST`` or
            ``HOST:PORT``, an IP address) instead of the system's.
    """

    heartbeat: float = 1.0
    heartbeat_misses: int = 3
    max_message_size: int = 4 << 20
    outbox_limit: int = 100_000
    connect_grace: float = 0.5
    lease_ttl: float = 30.0
    max_length: int | None = None
    queues: PathLike | Mapping[str, Mapping[str, object]] | None = None
    max_attempts: int = 0
    max_prefetch: int = DEFAULT_MAX_PREFETCH
    max_lease_ttl: float = DEFAULT_MAX_LEASE_TTL
    max_queues: int = 10_000
    max_memory: int | None = DEFAULT_MAX_MEMORY
    store: PathLike | None = None
    synchronous: str = "full"
    min_free_disk: int | None = None
    salvage: bool = False
    attempt_timeout: float | None = None
    outbox: PathLike | None = None
    key: PathLike | None = None
    server_key: PathLike | None = None
    allow: PathLike | None = None
    insecure: bool = False
    discover: PathLike | None = None
    discover_interval: float | None = None
    nameserver: str | None = None

    def check(self, bind: list[str]) -> None:
        """Raises:
        ConfigurationError: options that do not go together or are out of range.
        """
        if self.outbox is not None and bind:
            raise ConfigurationError(
                "outbox= is for a node that sends to others; a node with bind= stores "
                "what it is sent with store="
            )
        if self.store is not None and not bind:
            raise ConfigurationError(
                "store= makes the queues a node hosts durable; give it bind= addresses too"
            )
        if self.synchronous not in ("full", "normal"):
            raise ConfigurationError(
                f"synchronous must be 'full' or 'normal', not {self.synchronous!r}"
            )
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise ConfigurationError(
                f"attempt_timeout must be > 0 seconds, not {self.attempt_timeout!r}"
            )
        for name in ("max_queues", "max_memory"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigurationError(f"{name} must be an int, not {value!r}")
            if value is not None and value < 1:
                raise ConfigurationError(f"{name} must be at least 1, not {value}")
        self.queue_policies()
        self.discovery_source()
        self.discovery_nameserver()

    def discovery_source(self) -> Source | None:
        """The source ``discover`` names (None without one).

        Raises:
            ConfigurationError: a malformed source, an interval or a
                nameserver without a source, or a nameserver for a source
                that does not ask DNS servers itself.
        """
        if self.discover is None:
            for name in ("discover_interval", "nameserver"):
                if getattr(self, name) is not None:
                    raise ConfigurationError(f"{name}= goes with discover=")
            return None
        discover = self.discover
        if not isinstance(discover, str) and isinstance(discover, os.PathLike):
            discover = f"file://{os.fspath(discover)}"  # a path is a node file
        source = parse_source(discover, self.discover_interval)
        if self.nameserver is not None and source.kind is not SourceKind.SRV:
            raise ConfigurationError(
                "nameserver= is for srv:// discovery (dns:// asks the system resolver)"
            )
        return source

    def discovery_nameserver(self) -> tuple[str, int] | None:
        """Raises:
        ConfigurationError: ``nameserver`` is not an IP address with an optional port.
        """
        return None if self.nameserver is None else parse_nameserver(self.nameserver)

    def store_options(self) -> dict[str, Any]:
        """Options of the SqliteStore behind ``store=`` (docs/durability.md)."""
        options: dict[str, Any] = {"salvage": self.salvage}
        if self.min_free_disk is not None:
            options["min_free_disk"] = self.min_free_disk
        return options

    def queue_policies(self) -> QueuePolicies:
        """The node-wide policy and the per-queue overrides of ``queues``.

        Raises:
            ConfigurationError: a bound out of range, or a bad ``queues`` file.
        """
        if self.max_length is not None and (
            isinstance(self.max_length, bool)
            or not isinstance(self.max_length, int)
            or self.max_length < 1
        ):
            raise ConfigurationError(f"max_length must be an int >= 1, not {self.max_length!r}")
        default = dataclasses.replace(self.queue_policy(), max_length=self.max_length)
        return load_queue_policies(default, self.queues)

    def queue_policy(self) -> QueuePolicy:
        """The policy of the queues this node hosts.

        Raises:
            ConfigurationError: a bound that is not a sane number.
        """
        lease_ttl, max_attempts = self.lease_ttl, self.max_attempts
        max_prefetch, max_lease_ttl = self.max_prefetch, self.max_lease_ttl
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 0:
            raise ConfigurationError(f"max_attempts must be an int >= 0, not {max_attempts!r}")
        if isinstance(max_prefetch, bool) or not isinstance(max_prefetch, int):
            raise ConfigurationError(f"max_prefetch must be an int, not {max_prefetch!r}")
        if not 1 <= max_prefetch <= MAX_FRAME_ITEMS:
            raise ConfigurationError(
                f"max_prefetch must be 1 to {MAX_FRAME_ITEMS}, not {max_prefetch}"
            )
        for name, value in (("lease_ttl", lease_ttl), ("max_lease_ttl", max_lease_ttl)):
            if not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
                raise ConfigurationError(
                    f"{name} must be 0 to {MAX_SECONDS:g} seconds, not {value!r}"
                )
        return QueuePolicy(
            lease_ttl=float(lease_ttl),
            max_lease_ttl=max(float(max_lease_ttl), float(lease_ttl)),
            max_prefetch=max_prefetch,
            max_attempts=max_attempts,
        )
