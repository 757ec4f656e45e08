"""``@app.every`` and ``@app.cron``: once per period across every running
copy of an app, on every transport, with copies that start at different
times and one that is killed (-9) mid-period.

The copies are real processes (``tests/scheduleproc.py``); on tcp they
share a real ``pigeon node``. Each prints the periods it ran; the test
checks that no period ran twice, that the periods between the first and
the last were run, and that none ran before its time. Periods are 2 s:
the checks count periods, they never time anything as "fast".
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from brokers import AMQP_URL, ANY_PORT, NATS_URL, require

import pigeon
from pigeon.errors import ConfigurationError

SCHEDULEPROC = str(Path(__file__).with_name("scheduleproc.py"))
PERIOD = 2.0
START_TIMEOUT = 30.0


class Proc:
    """A child process whose output goes to a file (read at any time)."""

    def __init__(self, argv: list[str], out: Path) -> None:
        self.out = out
        with open(out, "wb") as sink:
            self.popen = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.out.read_text()

    def wait_said(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text(), re.M)
            if found:
                return found
            assert self.popen.poll() is None, f"{self.out.name} exited:\n{self.text()}"
            time.sleep(0.05)
        raise AssertionError(f"{self.out.name} never said {pattern!r}:\n{self.text()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def fired(self) -> list[tuple[int, int]]:
        """(start ms, ms late) of each period this copy ran."""
        return [
            (int(s), int(late))
            for s, late in re.findall(r"^fired (\d+) (-?\d+)$", self.text(), re.M)
        ]


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            proc.kill()


def start_node(tmp_path: Path, procs: list[Proc]) -> str:
    node = Proc(
        [sys.executable, "-m", "pigeon.cli.main", "node", "--bind", ANY_PORT, "--heartbeat", "0.2"],
        tmp_path / "node.out",
    )
    procs.append(node)
    return node.wait_said(r"serving (tcp://\S+?);").group(1)


def url_for(transport: str, tmp_path: Path, procs: list[Proc]) -> str:
    if transport == "tcp":
        return start_node(tmp_path, procs)
    return require(NATS_URL if transport == "nats" else AMQP_URL)


def wait_until_wall(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def mid_period(after: float) -> float:
    """A quarter into the first period that starts after ``after``: away
    from both the run at its start and the ticks sent half-way."""
    return (int(after // PERIOD) + 1) * PERIOD + PERIOD / 4


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "transport",
    [
        "tcp",
        pytest.param("nats", marks=pytest.mark.broker),
        pytest.param("amqp", marks=pytest.mark.broker),
    ],
)
def test_each_period_runs_once_across_copies_and_a_kill(
    transport: str, tmp_path: Path, procs: list[Proc]
) -> None:
    url = url_for(transport, tmp_path, procs)
    name = "beat" + uuid.uuid4().hex[:8]

    def copy(who: str) -> Proc:
        proc = Proc([sys.executable, SCHEDULEPROC, url, name, str(PERIOD)], tmp_path / f"{who}.out")
        procs.append(proc)
        proc.wait_said("^ready$")
        return proc

    first = copy("first")
    time.sleep(PERIOD * 0.6)  # the second starts part-way into a period
    second = copy("second")
    third = copy("third")
    both_up = time.time()
    wait_until_wall(mid_period(both_up + 2 * PERIOD))
    killed_at = time.time()
    first.kill()  # -9, a quarter into a period
    wait_until_wall(mid_period(killed_at + 2 * PERIOD))
    ended_at = time.time()
    for proc in (second, third):
        proc.stop()

    runs = [run for proc in (first, second, third) for run in proc.fired()]
    starts = Counter(start for start, _ in runs)
    twice = {start: n for start, n in starts.items() if n > 1}
    assert not twice, f"periods run more than once: {twice}\n{[p.text() for p in procs]}"
    assert all(late >= 0 for _, late in runs), f"a period ran before its time: {runs}"
    # Every period from the one after all copies were up to the last whole
    # one before the end ran (on a busy machine a tick may be late, never lost).
    first_start = (int(both_up // PERIOD) + 1) * PERIOD
    expected = {
        round((first_start + k * PERIOD) * 1000)
        for k in range(int((ended_at - PERIOD / 2 - first_start) // PERIOD) + 1)
    }
    assert expected <= set(starts), f"missed periods {sorted(expected - set(starts))}"
    after_kill = [s for s, _ in second.fired() + third.fired() if s > killed_at * 1000]
    assert after_kill, "no copy ran a period after one was killed"
    stats = [json.loads(p.wait_said(r"^stats (.*)$", 5).group(1)) for p in (second, third)]
    assert all(s[name]["sent"] >= 1 for s in stats)


# -- in one process (memory://), and bad input -------------------------------------


@pytest.mark.timeout(60)
def test_copies_on_memory_run_each_period_once() -> None:
    ran: list[tuple[str, float]] = []
    url = "memory://sched" + uuid.uuid4().hex[:8]

    def make(who: str) -> pigeon.App:
        app = pigeon.App(url)

        @app.every(1.0, name="tick")
        async def tick(at: datetime) -> None:
            ran.append((who, at.timestamp()))

        @app.cron("* * * * *", name="minutely")
        def minutely() -> None:  # present, to show it coexists
            ran.append((who + "-cron", 0.0))

        return app

    async def scenario() -> None:
        one, two = make("one"), make("two")
        await one.start()
        await asyncio.sleep(0.5)
        await two.start()
        try:
            deadline = time.monotonic() + 30
            while len({t for who, t in ran if "cron" not in who}) < 4:
                assert time.monotonic() < deadline, ran
                await asyncio.sleep(0.05)
        finally:
            await two.stop()
            await one.stop()
        stats = one.schedule_stats()["tick"], two.schedule_stats()["tick"]
        assert stats[0]["sent"] >= 4 and stats[1]["sent"] >= 3

    asyncio.run(scenario())
    ticks = [t for who, t in ran if "cron" not in who]
    assert len(ticks) == len(set(ticks)), ran
    assert all(t == int(t) for t in ticks)  # periods start on whole seconds


@pytest.mark.parametrize(
    ("decorate", "rule"),
    [
        (lambda app: app.every(0), "every must be"),
        (lambda app: app.every(float("nan")), "every must be"),
        (lambda app: app.every(-5), "every must be"),
        (lambda app: app.cron("*/5 * * *"), "bad cron expression"),
        (lambda app: app.cron("99 * * * *"), "bad cron expression"),
        (lambda app: app.every(1, name="has space"), "schedule name"),
    ],
)
def test_bad_schedules_are_refused_when_decorated(decorate: object, rule: str) -> None:
    app = pigeon.App("memory://bad")
    with pytest.raises(ConfigurationError, match=rule):
        decorate(app)(lambda: None)  # type: ignore[operator]


def test_a_schedule_handler_takes_at_most_the_time() -> None:
    app = pigeon.App("memory://bad")
    with pytest.raises(TypeError, match="no argument or one"):
        app.every(1, name="y")(lambda a, b: None)
    app.every(1, name="x")(lambda: None)
    with pytest.raises(ConfigurationError, match="declared twice"):
        app.every(2, name="x")(lambda: None)


@pytest.mark.timeout(120)
def test_the_apps_doc_example_runs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "apps.md").read_text()
    section = doc.split("## Delayed and periodic work", 1)[1].split("\n## ", 1)[0]
    # The fragments show one call each; the complete programs run.
    programs = [
        block
        for block in re.findall(r"```python\n(.*?)```", section, flags=re.S)
        if "asyncio.run(" in block
    ]
    assert programs
    for program in programs:
        done = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "reminder: stand up" in done.stdout
        runs, periods = re.search(r"(\d+) runs in (\d+) periods", done.stdout).groups()  # type: ignore[union-attr]
        assert runs == periods and int(runs) >= 2, done.stdout
