"""The admin backend of amqp:// URLs (being built: every call says so)."""

from __future__ import annotations

from typing import Any

from .base import Admin
from .errors import NotSupported


class AmqpAdmin:
    """Placeholder until the amqp backend lands."""

    @classmethod
    async def open(cls, url: str, *, timeout: float = 3.0, **options: Any) -> Admin:
        raise NotSupported("admin", "amqp", "not available in this version yet")
