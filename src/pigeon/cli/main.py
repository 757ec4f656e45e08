"""``pigeon``: run the demo, a node, a bridge, the benchmark; see ``pigeon --help``.

Exit codes (``cli.exits``): 0 ok, 1 the operation failed, 2 a usage or
configuration error, 69 nothing reachable at the address given.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from .._extras import DISTRIBUTION, install_hint
from ..errors import ConfigurationError, PigeonError
from . import bridge, demo, keys, node
from .exits import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, Unreachable


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
    except BrokenPipeError:
        # The reader went away (``pigeon queues --json | head``): end quietly,
        # and let nothing else write to the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Unreachable as exc:
        print(f"pigeon {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PigeonError as exc:
        print(f"pigeon {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
