"""Middleware: hooks that see every message a connection sends, handles,
publishes, requests and serves, on every transport. Metrics
(``pigeon.metrics``) and spans (``pigeon.otel``) are middleware.

Register them with ``pigeon.connect(..., middleware=[...])`` or
``pigeon.App(..., middleware=[...])``. A hook that raises is counted
(``Connection.stats()["hook_errors"]``) and logged at WARNING; it never
stops a message, and the other middleware still run. With no middleware
registered, the hot path pays one check.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .message import Message
from .transports import Delivery

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Middleware", "Outcome", "RequestOutcome"]

log = logging.getLogger("pigeon.middleware")

# A hook that fails on every message would log on every message: the first
# ones are logged, then one in this many (every one is counted).
_LOG_FIRST = 10
_LOG_EVERY = 1000


class Outcome(enum.Enum):
    """How handling one delivery ended."""

    ACKED = "acked"  # the handler returned; the delivery was acked
    SETTLED = "settled"  # the handler returned having settled it by hand
    RETRIED = "retried"  # the handler raised; it will be delivered again
    DEAD_LETTERED = "dead_lettered"  # the handler raised for the last time
    ERROR = "error"  # cut short, or it could not be settled


class RequestOutcome(enum.Enum):
    """How one request (or the serving of one) ended."""

    OK = "ok"
    ERROR = "error"  # the server's handler raised (Rejected), or another failure
    TIMEOUT = "timeout"
    NO_RESPONDERS = "no_responders"


class Middleware:
    """Subclass it and override the hooks you need; each is a no-op here.

    Hooks run on the connection's event loop, so they must be quick and must
    not block. ``before_*`` hooks run in the handler's trace context
    (``pigeon.tracing.current()``) and may replace it; ``on_send``,
    ``on_publish`` and ``before_request`` may add headers to the message
    about to leave (a ``traceparent`` set there is kept).
    """

    def on_connect(self, connection: Connection) -> None:
        """The connection started."""

    def before_handle(self, delivery: Delivery) -> None:
        """A worker's or subscriber's handler is about to run ``delivery``."""

    def after_handle(self, delivery: Delivery, outcome: Outcome, seconds: float) -> None:
        """The handler ran for ``seconds`` and the delivery ended in ``outcome``."""

    def on_retry(self, delivery: Delivery, delay: float, error: str) -> None:
        """The handler raised ``error``; ``delivery`` comes back after ``delay`` s."""

    def on_dead_letter(self, delivery: Delivery, reason: str) -> None:
        """``delivery`` was dead-lettered by this worker, for ``reason``."""

    def on_send(self, queue: str, message: Message) -> None:
        """``message`` is about to be sent to ``queue``. (A ``send`` refused
        for want of room and offered again is seen once per offer.)"""

    def on_publish(self, topic: str, message: Message) -> None:
        """``message`` is about to be published on ``topic``."""

    def before_request(self, service: str, message: Message) -> None:
        """``message`` is about to be sent as a request to ``service``."""

    def after_request(
        self, service: str, message: Message, outcome: RequestOutcome, seconds: float
    ) -> None:
        """The request ended in ``outcome`` after ``seconds``."""

    def before_serve(self, service: str, message: Message) -> None:
        """A server of ``service`` is about to run its handler on ``message``."""

    def after_serve(
        self, service: str, message: Message, outcome: RequestOutcome, seconds: float
    ) -> None:
        """The server's handler ended in ``outcome`` (OK or ERROR) after ``seconds``."""


_HOOKS = (
    "on_connect",
    "before_handle",
    "after_handle",
    "on_retry",
    "on_dead_letter",
    "on_send",
    "on_publish",
    "before_request",
    "after_request",
    "before_serve",
    "after_serve",
)


def check_middleware(middleware: Sequence[Middleware] | None) -> tuple[Middleware, ...]:
    """``middleware`` as a tuple.

    Raises:
        TypeError: it is not a sequence of :class:`Middleware`.
    """
    if middleware is None:
        return ()
    if isinstance(middleware, (str, bytes, Middleware)) or not isinstance(
        middleware, (list, tuple)
    ):
        raise TypeError(f"middleware must be a list of pigeon.Middleware, not {middleware!r}")
    for item in middleware:
        if not isinstance(item, Middleware):
            raise TypeError(f"middleware must be pigeon.Middleware instances, not {item!r}")
    return tuple(middleware)


class Hooks:
    """Calls the hooks of a connection's middleware, each guarded: one that
    raises is counted in ``errors`` and logged, and the rest still run.

    Each attribute named after a hook calls only the middleware that
    override it (none overriding it: a call that does nothing).
    """

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self.middleware = tuple(middleware)
        self.errors = 0
        for name in _HOOKS:
            base = getattr(Middleware, name)
            bound = [
                getattr(m, name) for m in self.middleware if getattr(type(m), name) is not base
            ]
            setattr(self, name, self._guarded(name, bound))

    def _guarded(self, name: str, hooks: list[Callable[..., None]]) -> Callable[..., None]:
        def call(*args: Any) -> None:
            for hook in hooks:
                try:
                    hook(*args)
                except Exception:  # a hook's failure is counted, never the message's
                    self.errors += 1
                    if self.errors <= _LOG_FIRST or self.errors % _LOG_EVERY == 0:
                        log.warning(
                            "middleware hook %s.%s raised (%d hook errors so far)",
                            type(getattr(hook, "__self__", hook)).__name__,
                            name,
                            self.errors,
                            exc_info=True,
                        )

        return call

    # The hooks, typed for callers (set per instance in __init__).
    on_connect: Callable[[Connection], None]
    before_handle: Callable[[Delivery], None]
    after_handle: Callable[[Delivery, Outcome, float], None]
    on_retry: Callable[[Delivery, float, str], None]
    on_dead_letter: Callable[[Delivery, str], None]
    on_send: Callable[[str, Message], None]
    on_publish: Callable[[str, Message], None]
    before_request: Callable[[str, Message], None]
    after_request: Callable[[str, Message, RequestOutcome, float], None]
    before_serve: Callable[[str, Message], None]
    after_serve: Callable[[str, Message, RequestOutcome, float], None]
