"""``pigeon``: run apps and nodes, send and watch messages, operate queues,
run the demo and the benchmark; see ``pigeon --help``.

The command line is built on click (commands, options, help) with rich for
tables, live views and progress. Each command lives in its own module and
registers a click command here.

Exit codes (``cli.exits``): 0 ok, 1 the operation failed, 2 a usage or
configuration error, 69 nothing reachable at the address given.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

import click

from .._extras import DISTRIBUTION, install_hint
from ..errors import ConfigurationError, PigeonError
from .exits import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, Unreachable


def version() -> str:
    """The installed distribution's version, or the package's own when it
    runs without being installed (e.g. from a source tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (``pigeon queues --json | head``): end
            # quietly, and let nothing else write to the closed pipe at exit.
            # (Caught here: click itself would exit 1 on it.)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(EXIT_OK) from None


@click.group(
    cls=_Group,
    name="pigeon",
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
)
@click.option("--version", "show_version", is_flag=True, help="print the version and exit")
@click.pass_context
def cli(ctx: click.Context, show_version: bool) -> None:
    """Message queues for Python."""
    if show_version:
        click.echo(f"pigeon {version()}")
        ctx.exit(EXIT_OK)
    if ctx.invoked_subcommand is None:
        raise click.UsageError("a command is required", ctx)


@cli.command(
    name="bench",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def bench(argv: tuple[str, ...]) -> None:
    """Benchmark pigeon beside pyzmq, NATS and RabbitMQ (own options: see
    pigeon bench --help)."""
    try:
        from ..bench import main as bench_main
    except ImportError as exc:
        click.echo(f"pigeon bench needs its extras ({exc}): {install_hint('bench')}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(bench_main(list(argv)))


def _register() -> None:
    from .dashboard import dashboard

    cli.add_command(dashboard)
    from . import bridge, consume, demo, events, keys, messages, node

    for command in (node.node_command, demo.demo, bridge.bridge, keys.keys):
        cli.add_command(command)
    for command in (messages.send, messages.request, messages.publish):
        cli.add_command(command)
    for command in (consume.consume, events.subscribe, events.tail):
        cli.add_command(command)
    from .operate import COMMANDS as operating

    for command in operating:
        cli.add_command(command)


def _register_run() -> None:
    from .run import run

    cli.add_command(run)


_register()
_register_run()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "pigeon"
    try:
        cli.main(argv, prog_name="pigeon", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Abort:
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)  # a refusal worded by the command
            return EXIT_USAGE
        return EXIT_OK if exc.code is None else int(exc.code)
    except Unreachable as exc:
        click.echo(f"pigeon {command}: {exc}", err=True)
        return EXIT_UNAVAILABLE
    except PigeonError as exc:
        click.echo(f"pigeon {command}: {type(exc).__name__}: {exc}", err=True)
        return EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
