"""Options many commands share, as click decorators, and how they become
``pigeon.connect`` keywords. Each option may come from the environment
(``PIGEON_URL``, ``PIGEON_KEY``, ``PIGEON_SERVER_KEY``, ``PIGEON_LOG_LEVEL``,
``PIGEON_LOG_FORMAT``) so a deployment sets them once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Parsed(click.ParamType[T]):
    """An option's value parsed from its text by ``parse``: the errors it
    raises of the ``errors`` types are usage errors naming the option."""

    def __init__(
        self, name: str, parse: Callable[[str], T], errors: tuple[type[Exception], ...]
    ) -> None:
        self.name = name
        self._parse = parse
        self._errors = errors

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> T:
        if not isinstance(value, str):
            return cast(T, value)  # a default, given parsed
        try:
            return self._parse(value)
        except self._errors as exc:
            self.fail(str(exc), param, ctx)


def url_option(fn: F) -> F:
    """``--url``: where to connect (a pigeon URL: tcp://, nats://, amqp://, ...)."""
    return click.option(
        "--url",
        envvar="PIGEON_URL",
        metavar="URL",
        help="where to connect, e.g. tcp://127.0.0.1:5555, nats://host:4222 (or PIGEON_URL)",
    )(fn)


def key_options(fn: F) -> F:
    """``--key`` and ``--server-key`` for CURVE on brokerless links."""
    fn = click.option(
        "--server-key",
        envvar="PIGEON_SERVER_KEY",
        metavar="NODE.key",
        help="the node's public key (or PIGEON_SERVER_KEY)",
    )(fn)
    return click.option(
        "--key",
        envvar="PIGEON_KEY",
        metavar="PATH.key_secret",
        help="this client's secret key (or PIGEON_KEY)",
    )(fn)


def connect_options(key: str | None, server_key: str | None) -> dict[str, Any]:
    """The ``pigeon.connect`` keywords the key options ask for."""
    options: dict[str, Any] = {}
    if key:
        options["key"] = key
    if server_key:
        options["server_key"] = server_key
    return options


def json_option(fn: F) -> F:
    """``--json``: machine-readable output instead of a table or text."""
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(fn)


def timeout_option(default: float = 3.0) -> Callable[[F], F]:
    """``--timeout SECONDS`` for one operation."""

    def decorate(fn: F) -> F:
        return click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=default,
            show_default=True,
            metavar="SECONDS",
            help="how long to wait for an answer",
        )(fn)

    return decorate


# Readings of a system more often than this load it more than they show.
MIN_INTERVAL = 0.1


def interval_option(default: float) -> Callable[[F], F]:
    """``--interval S`` for a command that reads a system again and again."""

    def decorate(fn: F) -> F:
        return click.option(
            "--interval",
            type=click.FloatRange(min=MIN_INTERVAL),
            default=default,
            show_default=True,
            metavar="S",
            help="seconds between readings",
        )(fn)

    return decorate


def log_options(fn: F) -> F:
    """``--log-level`` and ``--log-format`` for long-running commands."""
    fn = click.option(
        "--log-format",
        envvar="PIGEON_LOG_FORMAT",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="one line per event as text, or as a JSON object (or PIGEON_LOG_FORMAT)",
    )(fn)
    return click.option(
        "--log-level",
        envvar="PIGEON_LOG_LEVEL",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        default="INFO",
        show_default=True,
        help="the lowest level logged (or PIGEON_LOG_LEVEL)",
    )(fn)
