"""A node's per-queue policies from a TOML file (``pigeon node --queues FILE``).

The file holds one table per queue name or pattern::

    [queue."orders"]
    max_attempts = 5
    max_length = 100000

    [queue."reports.>"]
    max_bytes = 67108864
    max_prefetch = 50

Fields: ``max_attempts``, ``max_length``, ``max_bytes``, ``max_prefetch``,
``lease_ttl`` and ``max_lease_ttl`` (see docs/protocol.md). Anything else,
and any value out of range, is a ConfigurationError naming the file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from ..._core.limits import QueuePolicy
from ..._core.queue_policies import QueuePolicies
from ...errors import ConfigurationError

PathLike = str | os.PathLike[str]


def load_queue_policies(
    default: QueuePolicy, source: PathLike | Mapping[str, Mapping[str, object]] | None
) -> QueuePolicies:
    """The node's queue policies: ``default`` and the overrides in ``source``
    (a TOML file, or the same tables as a mapping).

    Raises:
        ConfigurationError: the file cannot be read, is not valid TOML, or
            holds an unknown table or field or a value out of range.
    """
    if source is None:
        return QueuePolicies(default)
    where = "queues="
    if isinstance(source, Mapping):
        tables: object = source
    else:
        path = Path(source)
        where = str(path)
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except FileNotFoundError as exc:
            raise ConfigurationError(f"{path}: no such queue policy file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{path}: cannot read it ({exc})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: not valid TOML: {exc}") from exc
        unknown = sorted(set(data) - {"queue"})
        if unknown:
            raise ConfigurationError(f'{path}: unknown table {unknown[0]!r}; use [queue."NAME"]')
        tables = data.get("queue", {})
    if not isinstance(tables, Mapping) or not all(isinstance(t, Mapping) for t in tables.values()):
        raise ConfigurationError(f'{where}: each queue needs a table of fields ([queue."NAME"])')
    try:
        return QueuePolicies(default, tables)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
