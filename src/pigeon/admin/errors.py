"""What the admin layer raises, beside pigeon's own errors (``Forbidden``
when the system's ACL refuses the admin, ``Timeout`` when an answer is late).
"""

from __future__ import annotations

from ..errors import PigeonError, TransportError


class Unreachable(TransportError):
    """Nothing answered at the address given (no node, no broker)."""

    def __init__(self, address: str, why: str = "") -> None:
        super().__init__(
            f"Nothing reachable at {address}" + (f" ({why})" if why else ""), address=address
        )
        self.why = why


class NotSupported(PigeonError):
    """The system behind the URL has no way to do what was asked (the
    message says why, and what to do instead)."""

    def __init__(self, operation: str, transport: str, why: str) -> None:
        super().__init__(f"{operation} on {transport}: {why}")
        self.operation = operation
        self.transport = transport
