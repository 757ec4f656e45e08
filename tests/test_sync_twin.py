"""pigeon.sync is the complete blocking twin of the async API: every public
method and property of each async class has a twin with the same parameters
(names, kinds, defaults, annotations) and the same return type, up to the
async -> sync mapping (pigeon.X -> pigeon.sync.X, asyncio.Future ->
concurrent.futures.Future, "awaitable or not" -> plain)."""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import functools
import inspect
import operator
import time
import types
import typing
from typing import Any

import pytest

import pigeon
import pigeon.sync

# The async classes that have a blocking twin.
TWINS: list[tuple[type, type]] = [
    (pigeon.Connection, pigeon.sync.Connection),
    (pigeon.Worker, pigeon.sync.Worker),
    (pigeon.Server, pigeon.sync.Server),
    (pigeon.Delivery, pigeon.sync.Delivery),
]

# Async protocol methods and their blocking counterparts.
DUNDER_TWINS = {"__aenter__": "__enter__", "__aexit__": "__exit__", "__await__": "start"}

_CLASS_MAP: dict[Any, Any] = {a: s for a, s in TWINS}
_CLASS_MAP[asyncio.Future] = concurrent.futures.Future


def to_sync(hint: Any) -> Any:
    """The type the blocking twin should use where the async API uses ``hint``."""
    if hint in _CLASS_MAP:
        return _CLASS_MAP[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None or not args:
        return hint
    if origin in (typing.Union, types.UnionType):
        # "Awaitable[X] | X" (a handler may be async or not) is just X when blocking.
        plain = [a for a in args if typing.get_origin(a) is not collections.abc.Awaitable]
        mapped = list(dict.fromkeys(to_sync(a) for a in plain))
        return functools.reduce(operator.or_, mapped)
    if origin is collections.abc.Callable:
        params, result = args[:-1], args[-1]
        if params and isinstance(params[0], list):
            params = tuple(params[0])
        return collections.abc.Callable[[to_sync(p) for p in params], to_sync(result)]
    if origin is collections.abc.Generator:  # __await__: Generator[Any, None, X] -> X
        return to_sync(args[2])
    return _CLASS_MAP.get(origin, origin)[tuple(to_sync(a) for a in args)]


def _hints(fn: Any) -> dict[str, Any]:
    return typing.get_type_hints(fn)


def public_members(cls: type) -> dict[str, Any]:
    """Public functions, properties and slots of ``cls`` itself, plus the
    async protocol methods (under their blocking names)."""
    out: dict[str, Any] = {}
    for name, member in vars(cls).items():
        if name in DUNDER_TWINS:
            out[DUNDER_TWINS[name]] = member
        elif not name.startswith("_") and (
            inspect.isfunction(member)
            or isinstance(member, property)
            or inspect.ismemberdescriptor(member)
        ):
            out[name] = member
    return out


def twin_problems(async_cls: type, sync_cls: type) -> list[str]:
    """Every way ``sync_cls`` falls short of being the twin of ``async_cls``."""
    problems: list[str] = []
    where = f"pigeon.sync.{sync_cls.__name__}"
    for name, member in public_members(async_cls).items():
        twin = inspect.getattr_static(sync_cls, name, None)
        if twin is None:
            problems.append(f"{where} lacks {name!r}")
            continue
        if not inspect.isfunction(member):  # a property or slot: an attribute
            if not (isinstance(twin, property) or inspect.ismemberdescriptor(twin)):
                problems.append(f"{where}.{name} is not an attribute (property or slot)")
            elif isinstance(member, property) and isinstance(twin, property):
                want = to_sync(_hints(member.fget).get("return"))
                got = _hints(twin.fget).get("return")
                if want != got:
                    problems.append(f"{where}.{name} is {got}, expected {want}")
            continue
        if not inspect.isfunction(twin):
            problems.append(f"{where}.{name} is not a method")
            continue
        if inspect.iscoroutinefunction(twin):
            problems.append(f"{where}.{name} is a coroutine function; it must block")
        want_sig, got_sig = inspect.signature(member), inspect.signature(twin)
        want_params, got_params = (
            list(want_sig.parameters.values()),
            list(got_sig.parameters.values()),
        )
        if [(p.name, p.kind) for p in want_params] != [(p.name, p.kind) for p in got_params]:
            problems.append(f"{where}.{name}{got_sig} has other parameters than {want_sig}")
            continue
        want_hints, got_hints = _hints(member), _hints(twin)
        for param, got_param in zip(want_params, got_params, strict=True):
            if param.default != got_param.default:
                problems.append(
                    f"{where}.{name}: {param.name} defaults to {got_param.default!r}, "
                    f"expected {param.default!r}"
                )
            want = to_sync(want_hints.get(param.name))
            if want != got_hints.get(param.name):
                problems.append(
                    f"{where}.{name}: {param.name} is {got_hints.get(param.name)}, expected {want}"
                )
        want = to_sync(want_hints.get("return"))
        if want != got_hints.get("return"):
            problems.append(f"{where}.{name} returns {got_hints.get('return')}, expected {want}")
    return problems


@pytest.mark.parametrize(("async_cls", "sync_cls"), TWINS, ids=[a.__name__ for a, _ in TWINS])
def test_every_public_member_has_a_twin_with_the_same_signature(
    async_cls: type, sync_cls: type
) -> None:
    assert twin_problems(async_cls, sync_cls) == []


def test_the_twin_check_names_what_is_missing_or_different() -> None:
    class Async:
        @property
        def ready(self) -> bool:
            return True

        async def send(self, queue: str, *, timeout: float = 30.0) -> None: ...

        def send_nowait(self, queue: str) -> asyncio.Future[None]: ...

        async def close(self) -> None: ...

        async def __aenter__(self) -> Async: ...

    class Sync:
        async def send(self, queue: str, *, timeout: float = 10.0) -> None: ...

        def send_nowait(self, queue: str) -> asyncio.Future[None]: ...

        def close(self, timeout: float = 5.0) -> None: ...

    problems = "\n".join(twin_problems(Async, Sync))
    assert "lacks 'ready'" in problems
    assert "lacks '__enter__'" in problems
    assert "send is a coroutine function" in problems
    assert "timeout defaults to 10.0, expected 30.0" in problems
    assert "send_nowait returns" in problems and "concurrent.futures" in problems
    assert "Sync.close(self, timeout" in problems and "has other parameters" in problems


def test_to_sync_maps_the_async_types() -> None:
    handler = collections.abc.Callable[[pigeon.Delivery], collections.abc.Awaitable[Any] | Any]
    assert to_sync(handler) == collections.abc.Callable[[pigeon.sync.Delivery], Any]
    assert to_sync(asyncio.Future[None]) == concurrent.futures.Future[None]
    assert to_sync(pigeon.Worker | None) == pigeon.sync.Worker | None


def test_send_many_on_the_sync_twin() -> None:
    with pigeon.sync.connect("memory://sync-send-many") as conn:
        got: list[str] = []
        conn.consume("jobs", lambda d: got.append(d.message.text))
        conn.send_many("jobs", [f"m{i}" for i in range(10)]).result(5)
        conn.flush()
        deadline = 50
        while len(got) < 10 and deadline:
            time.sleep(0.05)
            deadline -= 1
        assert sorted(got) == sorted(f"m{i}" for i in range(10))
        with pytest.raises(pigeon.ConfigurationError):
            conn.send_many("bad name", [b"x"])


def test_sync_errors_are_raised_in_the_calling_thread() -> None:
    conn = pigeon.sync.connect("memory://sync-errors")
    with pytest.raises(pigeon.NotStartedError):
        conn.send_nowait("q", "x")
    with conn:
        conn.send("q", "x")
    with pytest.raises(pigeon.ClosedError):
        conn.send_many("q", ["x"])
