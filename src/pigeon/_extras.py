"""What to tell a user whose install lacks an optional extra."""

from __future__ import annotations

DISTRIBUTION = "pigeon-queues"


def install_hint(extra: str) -> str:
    """How to get ``extra``: from PyPI, or in a clone of the repository."""
    return f"pip install '{DISTRIBUTION}[{extra}]' (in a clone: pip install -e '.[{extra}]')"
