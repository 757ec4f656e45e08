"""CURVE keys for the encrypted rows: made afresh in a temporary directory
for each variant, and removed when it ends.

One node (server) key and one client key, and an ACL that grants the client
every verb on every name, so pigeon's checks run on every frame but never
refuse one. The raw pyzmq rows use the same two key pairs.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

ACL = """\
[clients.bench]
key = "client.key"
send = [">"]
consume = [">"]
call = [">"]
serve = [">"]
admin = true
"""


@contextlib.contextmanager
def curve_keys() -> Iterator[dict[str, str]]:
    """Yield the key files and keys of one encrypted run (picklable, for ``Ctl.cfg``).

    ``node_key``/``node_public``/``client_key``/``allow`` are file paths for
    ``pigeon.connect``; ``server_public``/``server_secret``/``client_public``/
    ``client_secret`` are the Z85 keys for raw sockets.
    """
    from pigeon.security.keys import load_secret, new_keys

    with tempfile.TemporaryDirectory(prefix="pigeon-bench-keys-") as tmp:
        root = Path(tmp)
        new_keys(root / "node")
        new_keys(root / "client")
        acl = root / "acl.toml"
        acl.write_text(ACL, encoding="utf-8")
        node = load_secret(root / "node.key_secret")
        client = load_secret(root / "client.key_secret")
        yield {
            "node_key": str(root / "node.key_secret"),
            "node_public": str(root / "node.key"),
            "client_key": str(root / "client.key_secret"),
            "allow": str(acl),
            "server_public": node.public,
            "server_secret": node.secret,
            "client_public": client.public,
            "client_secret": client.secret,
        }


def node_kwargs(keys: dict[str, str] | None) -> dict[str, str]:
    """``pigeon.connect`` options of the node that binds: its key and the ACL."""
    return {"key": keys["node_key"], "allow": keys["allow"]} if keys else {}


def client_kwargs(keys: dict[str, str] | None) -> dict[str, str]:
    """``pigeon.connect`` options of a node that connects: its key and the server's."""
    return {"key": keys["client_key"], "server_key": keys["node_public"]} if keys else {}
