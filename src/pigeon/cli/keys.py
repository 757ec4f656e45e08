"""``pigeon keys new PATH``: make a CURVE key pair for a node or a client."""

from __future__ import annotations

import argparse
from typing import Any

from ..security.keys import new_keys


def add_parser(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="make CURVE keys for nodes and clients")
    actions = keys.add_subparsers(dest="action", required=True)
    new = actions.add_parser(
        "new", help="write PATH.key (public, to hand out) and PATH.key_secret (mode 0600)"
    )
    new.add_argument("path", metavar="PATH", help="where to write, without the suffix")
    new.set_defaults(func=run_new)


def run_new(args: argparse.Namespace) -> int:
    public, secret = new_keys(args.path)
    print(f"public key: {public} (give it to the peers that must trust this one)")
    print(f"secret key: {secret} (mode 0600; keep it here)")
    return 0
