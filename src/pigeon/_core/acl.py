"""Who may do what on a node: grants per client key, decided without I/O.

Rule 1: a client is known by its public key (Z85 text), never by a name or
routing id it chose. An unknown key has no grants.
Rule 2: every operation is a verb on a name. ``send`` and ``consume`` name a
queue, ``call`` and ``serve`` a service; ``admin`` (stats, dead letters,
replay) is all or nothing. A verb is allowed if any of the client's
patterns for it matches the name (``names.Pattern``).
Rule 3: the grants are data; replacing them (a reload) takes effect for the
next operation of every client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .names import Pattern, compile_pattern


class Verb(StrEnum):
    SEND = "send"
    CONSUME = "consume"
    CALL = "call"
    SERVE = "serve"
    ADMIN = "admin"


NAMED_VERBS = (Verb.SEND, Verb.CONSUME, Verb.CALL, Verb.SERVE)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one client may do."""

    name: str  # the table's name in the ACL, for messages and stats
    key: str  # Z85 public key
    patterns: Mapping[Verb, tuple[Pattern, ...]] = field(default_factory=dict)
    admin: bool = False

    def allows(self, verb: Verb, name: str = "") -> bool:
        if verb is Verb.ADMIN:
            return self.admin
        return any(p.matches(name) for p in self.patterns.get(verb, ()))


def make_grant(
    name: str, key: str, lists: Mapping[Verb, Iterable[str]], *, admin: bool = False
) -> Grant:
    """Build a grant from pattern texts.

    Raises:
        ValueError: a pattern is invalid.
    """
    patterns = {
        verb: tuple(compile_pattern(p) for p in lists.get(verb, ())) for verb in NAMED_VERBS
    }
    return Grant(name, key, patterns, admin)


class Acl:
    """The grants of every known client key (see the module docstring)."""

    def __init__(self, grants: Iterable[Grant] = ()) -> None:
        self._by_key: dict[str, Grant] = {}
        for grant in grants:
            if grant.key in self._by_key:
                other = self._by_key[grant.key].name
                raise ValueError(f"clients {other!r} and {grant.name!r} have the same key")
            self._by_key[grant.key] = grant

    def knows(self, key: str) -> bool:
        return key in self._by_key

    def grant(self, key: str) -> Grant | None:
        return self._by_key.get(key)

    def allows(self, key: str, verb: Verb, name: str = "") -> bool:
        grant = self._by_key.get(key)
        return grant is not None and grant.allows(verb, name)

    def keys(self) -> list[str]:
        return list(self._by_key)
