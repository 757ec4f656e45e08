"""Telling "nothing listens there" at once, rather than after a timeout."""

from __future__ import annotations

import os


def refused_at(url: str) -> str:
    """Why nothing can be listening at a brokerless ``url`` (a missing ipc
    socket file), or "" when something may be."""
    scheme, _, rest = url.partition("://")
    if scheme == "ipc" and not os.path.exists(rest):
        return f"no socket file {rest}"
    return ""
