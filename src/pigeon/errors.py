"""The exceptions pigeon raises.

Every error pigeon raises on purpose derives from :class:`PigeonError`::

    PigeonError
     ├── ConfigurationError (ValueError)   bad URL, option or combination
     │    ├── KeyFileError                  a key file is missing, malformed or readable by others
     │    └── AclError                      an ACL file is malformed (names the line)
     ├── NotStartedError                    used before it was started (connect or start it first)
     ├── ClosedError                        you closed the object you used
     ├── TransportError                     connect failed / connection lost (retryable)
     │    ├── AuthenticationError           our key or login was refused, or the peer's key is wrong
     │    └── NoPigeonNode                  the peer at an address does not speak pigeon (no Hello)
     ├── Timeout (TimeoutError)             a deadline passed
     ├── ProtocolError
     │    ├── LocalProtocolError            we were asked to do something illegal
     │    └── RemoteProtocolError           a peer sent something malformed
     ├── Forbidden                          the peer's ACL does not grant this verb on this name
     ├── DeliveryError
     │    ├── NoResponders                  no live server offers the service
     │    ├── Rejected                      the server's handler failed the request
     │    ├── Backpressure                  a bounded buffer is full and the policy is "raise"
     │    └── SubscriberDisconnected        a slow subscriber was cut off (policy "disconnect")
     ├── ReplayTrimmed (ValueError)         a replay asked for history no longer retained
     ├── MessageTooLarge (ValueError)       a body is over the configured maximum size
     ├── DecodeError                        a body could not be decoded into the asked type
     └── StoreError                         the durable store failed or is unusable
"""

from __future__ import annotations


class PigeonError(Exception):
    """Root of every error pigeon raises on purpose."""


class ConfigurationError(PigeonError, ValueError):
    """Raised when a URL, option or combination of options is not valid."""


class NotStartedError(PigeonError):
    """Raised when an object is used before it was started (opened or connected)."""


class ClosedError(PigeonError):
    """Raised when an object is used after the caller closed it."""


class TransportError(PigeonError):
    """Raised when a connection could not be made or was lost; retrying may help."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class Timeout(PigeonError, TimeoutError):
    """Raised when an operation's timeout or deadline passed."""


class ProtocolError(PigeonError):
    """Base for violations of pigeon's wire or state rules."""


class LocalProtocolError(ProtocolError):
    """Raised when the caller asks for an illegal move (e.g. acking twice)."""


class RemoteProtocolError(ProtocolError):
    """Raised when a peer sends a malformed frame or an unknown protocol version."""


class DeliveryError(PigeonError):
    """Base for failures to get a message to, or an answer from, its destination."""


class NoResponders(DeliveryError):
    """Raised at once when no live server offers the requested service."""

    def __init__(self, service: str) -> None:
        super().__init__(f"no live server offers service {service!r}")
        self.service = service


class Rejected(DeliveryError):
    """Raised by ``request`` when the server's handler raised; carries its reason."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"service {service!r} failed the request: {reason}")
        self.service = service
        self.reason = reason


class Backpressure(DeliveryError):
    """Raised when a bounded buffer is full and its policy says to raise."""

    def __init__(self, what: str, limit: int | None = None) -> None:
        # ``limit`` is None where the refusing side does not say which of its
        # bounds was reached (a queue's length, its bytes, the node's memory).
        counted = "" if limit is None else f" ({limit} messages)"
        super().__init__(f"{what} is full{counted}")
        self.what = what
        self.limit = limit


class MessageTooLarge(PigeonError, ValueError):
    """Raised at the sender when a body is over the configured maximum size."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message body is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class DecodeError(PigeonError):
    """Raised when a body cannot be decoded as its content type or into the asked type."""


class StoreError(PigeonError):
    """Raised when the durable store is corrupt, full, locked or otherwise unusable."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class KeyFileError(ConfigurationError):
    """Raised when a key file is missing, malformed, of the wrong kind or readable by others."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class AclError(ConfigurationError):
    """Raised when an ACL file cannot be used; ``line`` says where, when known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class AuthenticationError(TransportError):
    """Raised when ``address`` refused our key or login, or its CURVE key is not the one given."""


class Forbidden(PigeonError):
    """Raised when the node's ACL does not grant ``verb`` on ``name`` to our key."""

    def __init__(self, verb: str, name: str, *, address: str | None = None) -> None:
        where = f" at {address}" if address else ""
        super().__init__(f"not allowed to {verb} {name!r}{where}")
        self.verb = verb
        self.name = name
        self.address = address


class NoPigeonNode(TransportError):
    """Raised when the peer at an address is no pigeon node: it refused the
    ZeroMQ handshake or never answered Hello."""

    def __init__(self, address: str, why: str = "the peer did not answer Hello") -> None:
        super().__init__(f"no pigeon node at {address} ({why})", address=address)


class SubscriberDisconnected(DeliveryError):
    """Raised when a topic's host cut a subscriber off because it fell
    behind and its slow-subscriber policy is ``disconnect``.

    Attributes:
        pattern: the subscription's pattern.
        reason: what the host said.
    """

    def __init__(self, pattern: str, reason: str) -> None:
        super().__init__(f"subscription {pattern!r} was disconnected: {reason}")
        self.pattern = pattern
        self.reason = reason


class ReplayTrimmed(PigeonError, ValueError):
    """Raised when a subscription asks to start at a sequence number that
    its topic no longer retains.

    Attributes:
        topic: the topic whose history is trimmed.
        first_retained: the first sequence number still retained (start
            there, or later).
    """

    def __init__(self, topic: str, asked: int, first_retained: int) -> None:
        super().__init__(
            f"topic {topic!r} no longer retains sequence number {asked}; the first "
            f"retained is {first_retained}"
        )
        self.topic = topic
        self.asked = asked
        self.first_retained = first_retained
