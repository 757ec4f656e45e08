"""``pigeon keys new PATH``: make a CURVE key pair for a node or a client."""

from __future__ import annotations

import click

from ..security.keys import new_keys


@click.group(name="keys")
def keys() -> None:
    """Make CURVE keys for nodes and clients."""


@keys.command(name="new")
@click.argument("path", metavar="PATH")
def new(path: str) -> None:
    """Write PATH.key (public, to hand out) and PATH.key_secret (mode 0600).

    PATH is where to write, without the suffix.
    """
    public, secret = new_keys(path)
    click.echo(f"public key: {public} (give it to the peers that must trust this one)")
    click.echo(f"secret key: {secret} (mode 0600; keep it here)")
