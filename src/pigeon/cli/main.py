"""``pigeon``: run the demo, a node, a bridge, the benchmark; see ``pigeon --help``."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from .._extras import DISTRIBUTION, install_hint
from ..errors import PigeonError
from . import bridge, demo, keys, node


def version() -> str:
    """The installed distribution's version, or the package's own when it
    runs without being installed (e.g. from a source tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def _bench(argv: list[str]) -> int:
    try:
        from ..bench import main as bench_main
    except ImportError as exc:
        print(
            f"pigeon bench needs its extras ({exc}): {install_hint('bench')}",
            file=sys.stderr,
        )
        return 2
    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The benchmark parses its own options.
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="pigeon", description="Message queues for Python.")
    parser.add_argument(
        "--version", action="store_true", help="print the version of pigeon and exit"
    )
    subparsers = parser.add_subparsers(dest="command")
    demo.add_parser(subparsers)
    node.add_parsers(subparsers)
    keys.add_parser(subparsers)
    bridge.add_parser(subparsers)
    subparsers.add_parser("bench", help="benchmark pigeon beside pyzmq, NATS and RabbitMQ")
    args = parser.parse_args(argv)
    if args.version:
        print(f"pigeon {version()}")
        return 0
    if args.command is None:
        parser.error("a command is required")
    try:
        return int(args.func(args))
    except PigeonError as exc:
        print(f"pigeon {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
