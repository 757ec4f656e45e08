"""The admin backend of nats:// URLs (being built: every call says so)."""

from __future__ import annotations

from typing import Any

from .base import Admin
from .errors import NotSupported


class NatsAdmin:
    """Placeholder until the nats backend lands."""

    @classmethod
    async def open(cls, url: str, *, timeout: float = 3.0, **options: Any) -> Admin:
        raise NotSupported("admin", "nats", "not available in this version yet")
