"""Reading an ACL file: one TOML table per client key.

```toml
[clients.fountain]
key = "fountain.key"      # a public key file (relative to this file) or the key
send = ["words"]          # queue name patterns
consume = []              # queue name patterns
call = ["case.*"]         # service name patterns
serve = []                # service name patterns (reserved; see docs/security.md)
admin = false             # stats, dead letters, replay
```

Anything else (an unknown field, a bad pattern, a key that is not one) is
refused when the file is read, naming the line.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from .._core.acl import NAMED_VERBS, Acl, Grant, Verb, make_grant
from .._core.names import compile_pattern
from ..errors import AclError, KeyFileError
from .keys import is_key_text, load_public

_FIELDS = {"key", "admin", *(verb.value for verb in NAMED_VERBS)}


def load_acl(path: str | os.PathLike[str]) -> Acl:
    """Read and check an ACL file.

    Raises:
        AclError: the file is missing, not TOML, or has an unknown field, a
            bad pattern or a bad key; ``line`` says where, when known.
    """
    path = Path(path)
    try:
        text = path.read_text("utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError as exc:
        raise AclError(f"{path}: no such ACL file", path=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AclError(f"{path}: cannot read it ({exc})", path=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise AclError(f"{path}: not valid TOML: {exc}", path=str(path)) from exc
    lines = text.splitlines()
    unknown = sorted(set(data) - {"clients"})
    if unknown:
        line = _find(lines, None, unknown[0])
        raise AclError(
            f"{path}:{line}: unknown table or field {unknown[0]!r}", path=str(path), line=line
        )
    clients = data.get("clients", {})
    if not isinstance(clients, dict):
        raise AclError(f"{path}: 'clients' must be tables", path=str(path))
    return Acl(_grant(path, lines, name, table) for name, table in clients.items())


def _grant(path: Path, lines: list[str], name: str, table: Any) -> Grant:
    where = _find(lines, name, None)
    if not isinstance(table, dict):
        raise AclError(
            f"{path}:{where}: [clients.{name}] must be a table", path=str(path), line=where
        )
    for field in table:
        if field not in _FIELDS:
            line = _find(lines, name, field)
            raise AclError(
                f"{path}:{line}: unknown field {field!r} in [clients.{name}]; "
                f"known: {', '.join(sorted(_FIELDS))}",
                path=str(path),
                line=line,
            )
    if "key" not in table or not isinstance(table["key"], str):
        raise AclError(
            f'{path}:{where}: [clients.{name}] needs key = "FILE.key"', path=str(path), line=where
        )
    key_value = table["key"]
    try:
        key = load_public(key_value if is_key_text(key_value) else path.parent / key_value)
    except KeyFileError as exc:
        line = _find(lines, name, "key")
        raise AclError(
            f"{path}:{line}: [clients.{name}] key: {exc}", path=str(path), line=line
        ) from exc
    lists: dict[Verb, list[str]] = {}
    for verb in NAMED_VERBS:
        value = table.get(verb.value, [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            line = _find(lines, name, verb.value)
            raise AclError(
                f"{path}:{line}: {verb.value} in [clients.{name}] must be a list of name patterns",
                path=str(path),
                line=line,
            )
        for pattern in value:
            try:
                compile_pattern(pattern)
            except ValueError as exc:
                line = _find(lines, name, verb.value)
                raise AclError(
                    f"{path}:{line}: {verb.value} in [clients.{name}]: {exc}",
                    path=str(path),
                    line=line,
                ) from exc
        lists[verb] = value
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        line = _find(lines, name, "admin")
        raise AclError(f"{path}:{line}: admin must be true or false", path=str(path), line=line)
    return make_grant(name, key, lists, admin=admin)


def _find(lines: list[str], client: str | None, field: str | None) -> int | None:
    """The 1-based line of ``field`` in ``[clients.CLIENT]`` (or of the table,
    or of a top-level name); None if it cannot be told."""
    in_table = client is None
    header = re.compile(r"^\s*\[\s*clients\s*\.\s*\"?" + re.escape(client or "") + r"\"?\s*\]")
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if client is not None and header.match(line):
            if field is None:
                return number
            in_table = True
            continue
        if stripped.startswith("[") and client is not None:
            in_table = False
        if in_table and field is not None and re.match(rf"^\s*\[?\s*{re.escape(field)}\b", line):
            return number
    return None
