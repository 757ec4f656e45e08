"""Broker availability for tests: skip with a reason on a machine without
the broker, fail when ``CI`` is set (CI must have it)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

NATS_URL = os.environ.get("PIGEON_NATS_URL", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("PIGEON_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
_DEFAULT_PORTS = {"nats": 4222, "amqp": 5672}


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), 1.0):
            return True
    except OSError:
        return False


def require(url: str) -> str:
    """Return ``url`` if its broker answers; otherwise skip (or fail in CI)."""
    if not reachable(url):
        reason = f"no broker at {url}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the broker must be there)")
        pytest.skip(reason)
    return url
