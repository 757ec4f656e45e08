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
import signal
import threading
import time
import types
import typing
from typing import Any

import pytest

import pigeon
import pigeon.admin
import pigeon.sync

# The async classes that have a blocking twin.
TWINS: list[tuple[type, type]] = [
    (pigeon.Connection, pigeon.sync.Connection),
    (pigeon.Worker, pigeon.sync.Worker),
    (pigeon.Server, pigeon.sync.Server),
    (pigeon.Delivery, pigeon.sync.Delivery),
    (pigeon.Subscriber, pigeon.sync.Subscriber),
    (pigeon.Event, pigeon.sync.Event),
    (pigeon.EventStream, pigeon.sync.EventStream),
    (pigeon.admin.Admin, pigeon.sync.Admin),
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


# -- the hand-over to the loop thread -------------------------------------
#
# Every blocking call goes through pigeon.sync._run_on: one call_soon_threadsafe
# starts the coroutine as a task on the loop thread, and the task hands its
# outcome back itself. These tests run it against a loop of their own.


@pytest.fixture
def loop_thread() -> collections.abc.Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


class Boom(Exception):
    pass


async def answer() -> int:
    return 42


def closed_within(coro: collections.abc.Coroutine[Any, Any, Any], seconds: float = 10.0) -> bool:
    """True once ``coro`` is closed (it runs on another thread)."""
    deadline = time.monotonic() + seconds
    while inspect.getcoroutinestate(coro) != inspect.CORO_CLOSED:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_call_runs_as_a_real_task_on_the_loop_thread(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    async def where() -> tuple[threading.Thread, bool]:
        async with asyncio.timeout(5):  # needs asyncio.current_task()
            await asyncio.sleep(0)
        return threading.current_thread(), asyncio.current_task() is not None

    thread, in_a_task = pigeon.sync._run_on(loop_thread, where())
    assert thread.name == "test-loop"
    assert in_a_task
    assert pigeon.sync._run_on(loop_thread, answer(), timeout=5) == 42


def test_errors_reach_the_caller_with_their_type(loop_thread: asyncio.AbstractEventLoop) -> None:
    error = Boom("from the loop")

    async def fail() -> None:
        await asyncio.sleep(0)
        raise error

    with pytest.raises(Boom) as caught:
        pigeon.sync._run_on(loop_thread, fail())
    assert caught.value is error


def test_a_base_exception_reaches_the_caller_and_the_loop_lives_on(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    async def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pigeon.sync._run_on(loop_thread, interrupt())
    assert pigeon.sync._run_on(loop_thread, answer(), timeout=5) == 42


def test_a_cancelled_call_raises_cancelled_error(loop_thread: asyncio.AbstractEventLoop) -> None:
    async def cancelled() -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    with pytest.raises(concurrent.futures.CancelledError):
        pigeon.sync._run_on(loop_thread, cancelled())


def test_a_timeout_cancels_the_running_call(loop_thread: asyncio.AbstractEventLoop) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    # A busy machine may not start the coroutine within a short timeout:
    # longer ones until it did (what happens if it did not is tested below).
    for timeout in (0.2, 1.0, 5.0, 20.0):
        coro = forever()
        with pytest.raises(TimeoutError):
            pigeon.sync._run_on(loop_thread, coro, timeout=timeout)
        assert closed_within(coro)
        if started.is_set():
            break
    assert started.is_set()
    assert cancelled.wait(10)


def test_a_call_that_times_out_before_it_starts_never_runs(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10)

    ran: list[int] = []

    async def body() -> None:
        ran.append(1)

    loop_thread.call_soon_threadsafe(hold)  # the loop thread is busy
    assert held.wait(10)
    coros = [body(), body()]
    try:
        with pytest.raises(TimeoutError):
            pigeon.sync._run_on(loop_thread, coros[0], timeout=0.05)
        with pytest.raises(TimeoutError):
            pigeon.sync._run_on(loop_thread, coros[1], timeout=0)
    finally:
        release.set()
    # Closed, not run and not left to warn that it was never awaited.
    assert all(closed_within(coro) for coro in coros)
    assert pigeon.sync._run_on(loop_thread, answer(), timeout=5) == 42
    assert ran == []


def test_an_interrupted_caller_cancels_the_call(loop_thread: asyncio.AbstractEventLoop) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def interrupt_when_started() -> None:
        if started.wait(10):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=interrupt_when_started)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pigeon.sync._run_on(loop_thread, forever())
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    assert cancelled.wait(10)


def test_a_blocking_call_on_its_own_loop_raises(loop_thread: asyncio.AbstractEventLoop) -> None:
    async def nested() -> str:
        coro = answer()
        with pytest.raises(RuntimeError, match="event loop it waits for"):
            pigeon.sync._run_on(loop_thread, coro)
        return inspect.getcoroutinestate(coro)

    assert pigeon.sync._run_on(loop_thread, nested(), timeout=5) == inspect.CORO_CLOSED


def test_a_call_on_a_closed_loop_raises() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    coro = answer()
    with pytest.raises(RuntimeError, match="closed"):
        pigeon.sync._run_on(loop, coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_many_threads_calling_at_once_each_get_their_own_outcome(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    async def echo(value: int) -> int:
        await asyncio.sleep(0)
        if value % 7 == 0:
            raise Boom(value)
        return value

    def caller(k: int) -> list[object]:
        out: list[object] = []
        for j in range(50):
            try:
                out.append(pigeon.sync._run_on(loop_thread, echo(k * 1000 + j), timeout=30))
            except Boom as error:
                out.append(("boom", error.args[0]))
        return out

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(caller, range(32)))
    assert results == [
        [("boom", v) if v % 7 == 0 else v for v in range(k * 1000, k * 1000 + 50)]
        for k in range(32)
    ]


def test_sync_requests_from_many_threads_and_their_errors() -> None:
    with pigeon.sync.connect("memory://sync-requests") as conn:
        conn.serve("double", lambda m: m.decode(int) * 2)

        def fail(message: pigeon.Message) -> None:
            raise ValueError("no")

        conn.serve("fail", fail)

        def slow(message: pigeon.Message) -> None:
            time.sleep(0.5)

        conn.serve("slow", slow)

        def caller(k: int) -> list[int]:
            return [conn.request("double", k * 100 + j, timeout=30).decode(int) for j in range(20)]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(caller, range(16)))
        assert results == [[2 * (k * 100 + j) for j in range(20)] for k in range(16)]
        with pytest.raises(pigeon.Rejected):
            conn.request("fail", 1, timeout=30)
        with pytest.raises(pigeon.Timeout):
            conn.request("slow", 1, timeout=0.05)
