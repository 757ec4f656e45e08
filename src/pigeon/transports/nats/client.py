"""The nats-py connection: opened with pigeon's reconnect policy, closed
without hanging on a lost socket."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Callback, Client, ErrorCallback

from ...errors import PigeonError
from .errors import map_exceptions
from .options import NatsOptions

log = logging.getLogger("pigeon.nats")


async def connect(
    url: str,
    servers: list[str],
    options: NatsOptions,
    *,
    on_error: ErrorCallback,
    on_disconnected: Callback,
    on_reconnected: Callback,
) -> Client:
    """Connect to the first server that answers.

    A server lost later is reconnected to for ever, every ``reconnect_wait``.

    Raises:
        TransportError: no server reachable.
        Timeout: no server answered within ``connect_timeout``.
    """
    with map_exceptions(f"connect to {url}", timeout=options.connect_timeout):
        nc = await nats.connect(
            servers,
            name=options.name,
            connect_timeout=options.connect_timeout,
            reconnect_time_wait=options.reconnect_wait,
            max_reconnect_attempts=1,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    # Give up at start when no server answers (nats-py would retry the
    # first connect forever with -1), but once connected never stop
    # reconnecting: nats-py reads this option on every reconnect.
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def close(nc: Client, timeout: float) -> None:
    """Flush what is buffered (settles, mostly) if still connected, then close.

    Never raises: what cannot be written now, JetStream redelivers.
    """
    try:
        with map_exceptions("close"):
            if nc.is_connected:
                # nats-py annotates the timeout as int but hands it to
                # asyncio.wait_for, which takes any number of seconds.
                await nc.flush(timeout=max(0.1, min(timeout, 1.0)))  # type: ignore[arg-type]
    except PigeonError:
        pass  # nothing more can be done for them: JetStream redelivers
    pending: int = getattr(nc, "_pending_data_size", 0)
    if not nc.is_connected and pending:
        # nats-py's close() writes what it buffered during an outage to
        # the lost socket and raises before releasing its subscriptions
        # and socket; those commands cannot reach a server anyway.
        nc._pending = []
        nc._pending_data_size = 0
    try:
        with map_exceptions("close"):
            await nc.close()
    except PigeonError as exc:
        log.debug("closing the NATS connection: %s", exc)
