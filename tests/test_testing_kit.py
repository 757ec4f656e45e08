"""``pigeon.testing.TestApp``: an app on ``memory://`` under a clock that moves
only when told. Retries, lease expiries, delayed nacks and deadlines fire on
``advance`` and not before; services, subscribers and the app's own sends
are seen as a user's test sees them; misuse gets a clear error."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import pigeon
import pigeon.sync
from pigeon import _clock
from pigeon.errors import ClosedError, ConfigurationError, NotStartedError, Rejected, Timeout
from pigeon.testing import LoopClock, SyncTestApp, TestApp


def no_retry_jitter(max_attempts: int = 3, base_delay: float = 10.0) -> pigeon.RetryPolicy:
    # No jitter: the delays are exact, so a test can step just before them.
    return pigeon.RetryPolicy(max_attempts=max_attempts, base_delay=base_delay, jitter=0.0)


def failing_app(attempts: list[int]) -> pigeon.App:
    # Built for a real node: the kit runs it on a memory hub of its own.
    app = pigeon.App("tcp://127.0.0.1:9")

    @app.worker("jobs", retry=no_retry_jitter())
    async def job(n: int) -> None:
        attempts.append(n)
        raise ValueError(f"job {n} failed")

    return app


def test_a_retry_fires_only_once_time_passes_its_backoff() -> None:
    attempts: list[int] = []

    async def main() -> None:
        async with TestApp(failing_app(attempts)) as t:
            await t.send("jobs", 1)
            assert attempts == [1]
            await t.advance(9.9)  # the first retry is due at 10 s
            assert attempts == [1]
            await t.advance(0.2)
            assert attempts == [1, 1]
            await t.advance(19.8)  # the second at 20 s after that
            assert attempts == [1, 1]
            await t.advance(0.2)
            assert attempts == [1, 1, 1]
            assert [f.error.args for f in t.errors] == [("job 1 failed",)] * 3
            assert [f.message.attempt for f in t.errors if f.message] == [1, 2, 3]

    started = time.monotonic()
    asyncio.run(main())
    # Thirty seconds of backoff were not waited for (a bound, not a speed check).
    assert time.monotonic() - started < 25


def test_the_same_scenario_through_the_blocking_form() -> None:
    attempts: list[int] = []
    with TestApp(failing_app(attempts)).sync() as t:
        t.send("jobs", 2)
        t.advance(9.9)
        assert attempts == [2]
        t.advance(0.2)
        assert attempts == [2, 2]
        t.advance(30)
        assert attempts == [2, 2, 2]
        assert t.queue("jobs")["dead"] == 1


def test_a_dead_letter_after_its_attempts_is_visible_with_its_reason() -> None:
    attempts: list[int] = []
    with TestApp(failing_app(attempts)).sync() as t:
        t.send("jobs", 3)
        t.advance(60)
        assert attempts == [3, 3, 3]
        [letter] = t.dead("jobs")
        assert letter.decode() == 3
        assert letter.attempts == 3
        assert letter.reason == "failed 3 of 3 attempts; last error: ValueError: job 3 failed"
        counts = t.queue("jobs")
        assert (counts["ready"], counts["in_flight"], counts["dead"]) == (0, 0, 1)
        assert t.dead("other") == []
        assert t.queue("other")["ready"] == 0


def test_a_lease_that_expires_is_redelivered() -> None:
    runs: list[tuple[int, bool]] = []
    app = pigeon.App("memory://ignored")

    @app.worker("slow", lease_ttl=10.0, concurrency=2)
    async def slow(message: pigeon.Message) -> None:
        runs.append((message.attempt, message.redelivered))
        if message.attempt == 1:
            await asyncio.sleep(3600)  # a worker that hangs past its lease

    with TestApp(app).sync() as t:
        t.send("slow", "x")
        assert runs == [(1, False)]
        t.advance(9.5)
        assert runs == [(1, False)]
        t.advance(1.0)
        assert runs == [(1, False), (2, True)]
        assert t.queue("slow")["in_flight"] == 0  # the second run acked it


def test_a_delayed_nack_comes_back_after_its_delay() -> None:
    seen: list[int] = []
    app = pigeon.App("memory://ignored")

    @app.worker("later")
    async def later(delivery: pigeon.Delivery) -> None:
        seen.append(delivery.message.attempt)
        if delivery.message.attempt == 1:
            await delivery.nack(delay=60.0)

    with TestApp(app).sync() as t:
        t.send("later", "x")
        t.advance(59)
        assert seen == [1]
        assert t.queue("later")["delayed"] == 1
        t.advance(2)
        assert seen == [1, 2]


def test_a_message_past_its_deadline_on_the_test_clock_is_dead_unrun() -> None:
    ran: list[str] = []
    app = pigeon.App("memory://ignored")

    @app.worker("one-at-a-time")
    async def busy(word: str) -> None:
        ran.append(word)
        if word == "first":
            await asyncio.sleep(10)

    with TestApp(app).sync() as t:
        t.send("one-at-a-time", "first")
        t.send("one-at-a-time", "second", ttl=5.0)  # waits behind "first"
        t.advance(10)
        assert ran == ["first"]
        [letter] = t.dead("one-at-a-time")
        assert letter.decode() == "second"
        assert letter.reason == "expired"


def test_a_request_to_a_service() -> None:
    app = pigeon.App("memory://ignored")

    @app.service("double")
    def double(n: int) -> int:  # a plain handler: run in a thread
        return n * 2

    @app.service("slow-double")
    async def slow_double(n: int) -> int:
        await asyncio.sleep(5)  # on the test clock: no real wait
        return n * 2

    @app.service("broken")
    async def broken(n: int) -> int:
        raise KeyError(n)

    async def main() -> None:
        async with TestApp(app) as t:
            assert (await t.request("double", 21)).decode() == 42
            offset = t.clock.offset
            assert (await t.request("slow-double", 4)).decode() == 8
            assert t.clock.offset - offset > 4.0  # moved, less the real time that passed
            with pytest.raises(Rejected, match="KeyError"):
                await t.request("broken", 7)
            [failure] = t.errors
            assert (failure.kind, failure.name, type(failure.error)) == (
                "service",
                "broken",
                KeyError,
            )
            with pytest.raises(Timeout):
                await t.request("slow-double", 1, timeout=2.0)

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 25  # bound, not a speed check


def test_a_subscriber_gets_what_is_published_and_sent_records_the_apps_output() -> None:
    app = pigeon.App("memory://ignored")
    events: list[tuple[str, Any]] = []

    @app.subscriber("orders.>")
    async def on_order(event: pigeon.Event) -> None:
        events.append((event.topic, event.decode()))
        assert app.connection is not None
        await app.connection.send("invoices", {"order": event.decode()["id"]})
        await app.connection.publish("billing.done", event.decode()["id"])

    with TestApp(app).sync() as t:
        t.publish("orders.eu", {"id": 1})
        t.publish("orders.us", {"id": 2})
        assert events == [("orders.eu", {"id": 1}), ("orders.us", {"id": 2})]
        assert [m.decode() for m in t.sent("invoices")] == [{"order": 1}, {"order": 2}]
        assert [m.decode() for m in t.published("billing.done")] == [1, 2]
        t.send("invoices", "from the test")
        assert len(t.sent("invoices")) == 2  # the test's own sends are not the app's
        assert t.sent("orders.eu") == []
        assert t.stats()["test"]["recorded"] == 4


def test_settle_waits_for_a_plain_handler_running_in_a_thread() -> None:
    app = pigeon.App("memory://ignored")
    done = threading.Event()

    @app.worker("blocking")
    def blocking(word: str) -> None:
        time.sleep(0.2)  # real blocking work in the handler's thread
        done.set()

    with TestApp(app).sync() as t:
        t.send("blocking", "x")
        assert done.is_set()
        assert t.queue("blocking")["acked"] == 1


def test_recording_is_bounded_and_counts_what_it_left_out() -> None:
    app = pigeon.App("memory://ignored")

    @app.worker("in")
    async def forward(n: int) -> None:
        assert app.connection is not None
        await app.connection.send("out", n)

    with TestApp(app, max_recorded=2).sync() as t:
        for n in range(5):
            t.send("in", n)
        assert [m.decode() for m in t.sent("out")] == [0, 1]
        assert t.stats()["test"]["unrecorded"] == 3


def test_the_loop_and_wall_clocks_come_back_after_close() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wall_before = _clock.wall()
        async with TestApp(pigeon.App("memory://ignored")) as t:
            await t.advance(3600)
            assert loop.time() - time.monotonic() > 3500  # less the real time that passed
            assert _clock.wall() - wall_before > 3500
            assert t.clock.wall() - time.time() > 3500
        assert abs(loop.time() - time.monotonic()) < 60
        assert abs(_clock.wall() - time.time()) < 60

    asyncio.run(main())


def test_misuse_is_refused_with_a_clear_error() -> None:
    app = pigeon.App("memory://ignored")

    async def main() -> None:
        t = TestApp(app)
        with pytest.raises(NotStartedError, match="not started"):
            await t.advance(1)
        async with t:
            for bad in (-1, float("nan"), float("inf"), "1"):
                with pytest.raises(ConfigurationError, match="advance"):
                    await t.advance(bad)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError, match="started already"):
                await t.start()
            with pytest.raises(ConfigurationError, match="already has a test clock"):
                await TestApp(pigeon.App("memory://other")).start()
            with pytest.raises(ConfigurationError, match="async with"):
                TestApp(app).sync().start()
        with pytest.raises(ClosedError, match="closed"):
            await t.send("q", 1)
        with pytest.raises(ClosedError, match="closed"):
            await t.start()
        await t.close()  # twice: nothing

    asyncio.run(main())
    with pytest.raises(ConfigurationError, match="max_recorded"):
        TestApp(app, max_recorded=-1)
    for bad_timeout in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError, match="settle_timeout"):
            TestApp(app, settle_timeout=bad_timeout)
    blocking = TestApp(app).sync()
    with pytest.raises(NotStartedError):
        blocking.advance(1)


def test_a_handler_that_never_ends_fails_settle_instead_of_hanging() -> None:
    app = pigeon.App("memory://ignored")
    release = threading.Event()

    @app.worker("stuck")
    def stuck(word: str) -> None:
        release.wait(30)  # a plain handler blocked on something real

    with TestApp(app, settle_timeout=0.5).sync() as t:
        with pytest.raises(Timeout, match="still busy"):
            t.send("stuck", "x")
        release.set()
        t.settle()


def test_every_verb_has_a_blocking_twin_with_the_same_signature() -> None:
    verbs = [
        name
        for name, member in inspect.getmembers(TestApp)
        if inspect.iscoroutinefunction(member)
        and not name.startswith("_")
        and name not in ("start", "close")
    ]
    assert verbs == ["advance", "publish", "request", "send", "settle"]
    for name in verbs:
        ours = inspect.signature(getattr(TestApp, name))
        twin = inspect.signature(getattr(SyncTestApp, name))
        assert list(ours.parameters) == list(twin.parameters), name
    for name in ("sent", "published", "queue", "dead", "stats", "errors", "clock"):
        assert hasattr(SyncTestApp, name), name


def test_the_pytest_plugin_in_a_users_test_run(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["pigeon.testing.pytest_plugin"]\n')
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import pigeon

            app = pigeon.App("memory://orders")
            tries = []

            @app.worker("orders", retry=pigeon.RetryPolicy(base_delay=5.0, jitter=0.0))
            async def handle(order: dict) -> None:
                tries.append(order["id"])
                if len(tries) == 1:
                    raise RuntimeError("flaky")

            def test_a_retry(pigeon_test_app):
                t = pigeon_test_app(app)
                t.send("orders", {"id": 1})
                assert tries == [1]
                t.advance(5.0)
                assert tries == [1, 1]
                assert [f.kind for f in t.errors] == ["worker"]

            def test_it_is_closed_after_the_test():
                assert app.connection is not None
                try:
                    app.connection.send_nowait("orders", 1)
                except pigeon.errors.ClosedError:
                    return
                raise AssertionError("still open")
            """
        )
    )
    run = user_pytest(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout


def user_pytest(directory: Path) -> subprocess.CompletedProcess[str]:
    """pytest as a user runs it on the tests in ``directory``, a warning an error."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_delayed_send_is_delivered_once_its_time_comes() -> None:
    got: list[str] = []
    app = pigeon.App("memory://ignored")

    @app.worker("reminders")
    async def remind(text: str) -> None:
        got.append(text)

    with TestApp(app).sync() as t:
        t.send("reminders", "in a minute", delay=60.0)
        t.send("reminders", "in two", not_before=t.clock.wall() + 120.0)
        assert t.queue("reminders")["delayed"] == 2
        t.advance(59)
        assert got == []
        t.advance(2)
        assert got == ["in a minute"]
        t.advance(60)
        assert got == ["in a minute", "in two"]


def test_a_schedule_runs_once_per_period_the_clock_passes() -> None:
    app = pigeon.App("memory://ignored")
    minutes: list[float] = []
    quarters: list[float] = []

    @app.every(60)
    async def each_minute(at: datetime) -> None:
        minutes.append(at.timestamp())

    @app.cron("*/15 * * * *")
    def each_quarter(at: datetime) -> None:  # a plain one: run in a thread
        quarters.append(at.timestamp())

    @app.every(1800, name="report")
    async def failing_report() -> None:
        raise OSError("disk full")

    with TestApp(app).sync() as t:
        began = t.clock.wall()  # the test clock starts at the real time
        t.advance(3600)
        assert len(minutes) == 60
        assert len(set(minutes)) == 60 and all(m % 60 == 0 for m in minutes)
        assert len(quarters) == 4 and all(q % 900 == 0 for q in quarters)
        t.advance(60)
        assert len(minutes) == 61
        # A scheduled function's failure is counted by the app, and shown here.
        # One report per half hour begun in the 61 minutes passed: 2, or 3
        # when the test started in the last minute of a half hour.
        reports = int(t.clock.wall() // 1800) - int(began // 1800)
        assert reports in (2, 3)
        assert [(f.kind, f.name, str(f.error)) for f in t.errors] == [
            ("schedule", "report", "disk full")
        ] * reports
        assert t.app.schedule_stats()["report"]["failures"] == reports


DOC = Path(__file__).parent.parent / "docs" / "testing.md"


def test_the_docs_example_runs_as_printed(tmp_path: Path) -> None:
    # Each file of the example is the block after a line that names it and ends in ':'.
    files = re.findall(r"`([\w.]+\.py)`[^\n`]*:\n\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert [name for name, _ in files] == ["shop.py", "conftest.py", "test_shop.py"]
    for name, code in files:
        (tmp_path / name).write_text(code)
    run = user_pytest(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 passed" in run.stdout


def test_a_plain_handler_settles_by_hand_from_its_thread() -> None:
    seen: list[int] = []
    app = pigeon.App("memory://ignored")

    @app.worker("by-hand")
    def by_hand(delivery: pigeon.sync.Delivery) -> None:
        seen.append(delivery.message.attempt)
        if delivery.message.attempt == 1:
            delivery.nack(delay=30.0)  # a blocking call, settled on the app's loop

    with TestApp(app).sync() as t:
        t.send("by-hand", "x")
        t.advance(29)
        assert seen == [1]
        t.advance(1)
        assert seen == [1, 2]
        assert t.queue("by-hand")["acked"] == 1


def test_the_loop_clock_fires_each_timer_at_its_own_time_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        clock = LoopClock()
        clock.install()
        try:
            fired: list[tuple[str, float]] = []
            start = loop.time()
            for name, delay in (("c", 30.0), ("a", 10.0), ("b", 20.0), ("late", 100.0)):
                loop.call_later(delay, lambda n=name: fired.append((n, loop.time() - start)))
            await clock.advance(50)
            assert [name for name, _ in fired] == ["a", "b", "c"]
            # Each saw the clock at its own time (plus the real time that passed).
            for (_, seen), due in zip(fired, (10.0, 20.0, 30.0), strict=True):
                assert due <= seen < due + 5
            assert clock.next_timer() is not None  # "late" still waits
            assert not clock.busy()
        finally:
            clock.uninstall()
        with pytest.raises(ClosedError):
            await clock.advance(1)
        with pytest.raises(ClosedError):
            clock.install()

    asyncio.run(main())
