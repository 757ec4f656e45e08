"""What to tell a user whose install lacks an optional extra."""

from __future__ import annotations

DISTRIBUTION = "pigeon-queues"


def install_hint(extra: str) -> str:
    """How to get ``extra``: from PyPI, or in a clone of the repository."""
    return f"pip install '{DISTRIBUTION}[{extra}]' (in a clone: pip install -e '.[{extra}]')"


def missing_transport(client: str, extra: str, error: ImportError) -> type:
    """A stand-in for a transport whose client library is not installed: making
    one raises ``ConfigurationError`` saying what to install."""
    from .errors import ConfigurationError

    class MissingTransport:
        """Stands in for the transport; making one always raises.

        Raises:
            ConfigurationError: the client library is not installed.
        """

        def __init__(self, url: object, **options: object) -> None:
            # The scheme only: the URL may hold a password.
            scheme = url.partition("://")[0] if isinstance(url, str) else extra
            raise ConfigurationError(
                f"{scheme}:// needs {client}, which is not installed: {install_hint(extra)}"
            ) from error

    return MissingTransport
