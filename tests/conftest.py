"""Settings for the whole suite.

The suite runs on busy machines (CI runners, laptops building other things),
so nothing here may depend on how fast a machine is. Hypothesis by default
fails an example that takes over 200 ms and a test whose data takes long to
generate; neither says anything about pigeon, so both are off everywhere.
Tests that need more time than pytest's default timeout say so themselves.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "pigeon",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pigeon"))


_began = 0.0


def pytest_sessionstart(session: pytest.Session) -> None:
    global _began
    _began = time.time()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, delete the empty, unused RabbitMQ queues recorded since this
    run began and compact the inventory (see
    brokers.delete_idle_queues_recorded_since), so runs do not pile up on
    the shared broker. Only in CI, which has the broker to itself:
    elsewhere another run on the same broker may have declared a queue it has
    not used yet."""
    import brokers

    if not os.environ.get("CI") or brokers.greets(brokers.AMQP_URL, wait=2.0) is not None:
        return
    try:
        import aio_pika  # noqa: F401
    except ImportError:
        return
    try:
        deleted, dropped = asyncio.run(
            asyncio.wait_for(
                brokers.delete_idle_queues_recorded_since(brokers.AMQP_URL, _began), 60
            )
        )
        print(f"\nRabbitMQ: {deleted} idle queues deleted, {dropped} gone names dropped")
    except Exception as exc:  # noqa: BLE001  (tidying must not turn a run red)
        print(f"\ncould not delete this run's idle RabbitMQ queues: {exc!r}")
