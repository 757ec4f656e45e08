"""Keys and permissions of a ZeroMQ node: which options make a node secure,
the socket options CURVE needs, and the guard that checks every frame a
peer sends against the ACL.

Deny by default: a node that binds an address other machines can reach
(anything but loopback, ``ipc://`` and ``inproc://``) needs ``key`` and
``allow``, unless the caller says ``insecure=True``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import zmq

from ..._core.acl import Acl, Verb
from ...errors import AuthenticationError, ConfigurationError
from ...security.acl_file import load_acl
from ...security.keys import KeyPair, load_public, load_secret
from .admin import ADMIN_SERVICES

log = logging.getLogger("pigeon.security")

# A peer refused again and again would log on every frame: the first ones
# are logged, then one in this many (every one is counted in ``forbidden``).
_LOG_FIRST = 10
_LOG_EVERY = 1000

KEY_ENV = "PIGEON_KEY"
SERVER_KEY_ENV = "PIGEON_SERVER_KEY"
_MAKE_KEYS = "make keys with 'pigeon keys new PATH' (see docs/security.md)"


@dataclass(frozen=True, slots=True)
class CurveClient:
    """This node's keys and the key it expects of the nodes it connects to."""

    keys: KeyPair
    server_public: str

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_serverkey = self.server_public.encode("ascii")
        sock.curve_publickey = self.keys.public.encode("ascii")
        sock.curve_secretkey = self.keys.secret.encode("ascii")


@dataclass(frozen=True, slots=True)
class CurveServer:
    """This node's keys for the peers that connect to it."""

    keys: KeyPair
    domain: str  # the ZAP domain: the node id

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret.encode("ascii")
        sock.zap_domain = self.domain.encode("utf-8")


@dataclass(slots=True)
class Security:
    """What ``resolve`` decided for one node."""

    client: CurveClient | None = None
    server: CurveServer | None = None
    allow_path: str | None = None
    acl: Acl | None = None


def is_local(address: str) -> bool:
    """True for addresses only this machine can reach: loopback tcp, ipc, inproc."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name, a host name: assume reachable


def resolve(
    connect: list[str],
    bind: list[str],
    *,
    node_id: str,
    key: str | os.PathLike[str] | None,
    server_key: str | os.PathLike[str] | None,
    allow: str | os.PathLike[str] | None,
    insecure: bool,
    environ: Mapping[str, str] = os.environ,
) -> Security:
    """Check the security options of a node and load its keys and ACL.

    Raises:
        ConfigurationError: a reachable bind without keys, or options that
            do not go together.
        KeyFileError: a key file is missing, malformed or readable by others.
        AclError: the ACL file is malformed.
    """
    key = key if key is not None else environ.get(KEY_ENV) or None
    server_key = server_key if server_key is not None else environ.get(SERVER_KEY_ENV) or None
    security = Security()
    reachable = [b for b in bind if not is_local(b)]
    if insecure:
        if key is not None or allow is not None or server_key is not None:
            raise ConfigurationError(
                "insecure=True turns keys off; do not give key, server_key or allow with it"
            )
        return security
    if bind and (key is not None or allow is not None):
        if key is None or allow is None:
            raise ConfigurationError(
                "a node that binds with keys needs both key= (its .key_secret file) and "
                "allow= (an ACL file naming the client keys it lets in)"
            )
    elif reachable:
        raise ConfigurationError(
            f"{reachable[0]} can be reached from other machines: give key= and allow= "
            f"(--key and --allow), or insecure=True (--insecure) to run it without; {_MAKE_KEYS}"
        )
    pair = load_secret(key) if key is not None else None
    if bind and pair is not None and allow is not None:
        security.server = CurveServer(pair, node_id)
        security.allow_path = os.fspath(allow)
        security.acl = load_acl(allow)
    if connect:
        if server_key is not None and pair is None:
            raise ConfigurationError(
                f"server_key= needs key= too (this node's own .key_secret); {_MAKE_KEYS}"
            )
        if pair is not None and server_key is None and not bind:
            raise ConfigurationError(
                "key= needs server_key= too: the public key (.key file) of the node to connect to"
            )
        if pair is not None and server_key is not None:
            security.client = CurveClient(pair, load_public(server_key))
    return security


@dataclass(slots=True)
class Guard:
    """Checks each frame of an authenticated peer against the ACL.

    Rule 1: a routing id belongs to the key it first came with; a frame from
    another key under that id is refused (``identity_conflicts``).
    Rule 2: every verb on every name is checked against the current ACL;
    a refusal is counted (``forbidden``).
    """

    acl: Acl
    owners: dict[bytes, str] = field(default_factory=dict)
    forbidden: int = 0
    identity_conflicts: int = 0
    last_forbidden: str = ""

    def claim(self, identity: bytes, user: str) -> bool:
        owner = self.owners.setdefault(identity, user)
        if owner != user:
            self.identity_conflicts += 1
            return False
        return True

    def allows(self, user: str, verb: Verb, name: str = "") -> bool:
        if self.acl.allows(user, verb, name):
            return True
        self.forbidden += 1
        grant = self.acl.grant(user)
        who = grant.name if grant is not None else user[:8] + "…"
        self.last_forbidden = f"{who}: {verb.value} {name!r}"
        if self.forbidden <= _LOG_FIRST or self.forbidden % _LOG_EVERY == 0:
            log.warning("refused (forbidden %d so far): %s", self.forbidden, self.last_forbidden)
        return False

    def forget(self, identity: bytes) -> None:
        self.owners.pop(identity, None)


def service_verb(service: str) -> Verb:
    """Calling an admin service needs ``admin``; any other, ``call``."""
    return Verb.ADMIN if service in ADMIN_SERVICES else Verb.CALL


def handshake_error(address: str, event: int, *, with_keys: bool) -> AuthenticationError:
    """What a failed handshake with ``address`` means, from libzmq's monitor event."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        why = "refused this node's key (it is not in the node's ACL)"
    elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        why = (
            "does not use keys, but this node was given key= and server_key="
            if with_keys
            else "requires keys: give key= and server_key= (or PIGEON_KEY and PIGEON_SERVER_KEY)"
        )
    else:
        why = "did not complete the CURVE handshake: is server_key= that node's public key?"
    return AuthenticationError(f"the node at {address} {why}", address=address)
