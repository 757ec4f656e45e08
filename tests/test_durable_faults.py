"""Crash-safety of durable queues with real processes, real sockets and
kill -9: a ``pigeon node --store`` host, producers and workers in their own
processes, each writing a history that ``pigeon.testing.history`` checks.

What must hold whatever is killed: every send the host confirmed is
delivered (nothing lost), and a message delivered more than once is marked
redelivered every time after the first.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from brokers import ANY_PORT, describe

import pigeon
from pigeon.testing.conformance import wait_until
from pigeon.testing.history import CheckResult, HistoryWriter, check, load_history

pytestmark = pytest.mark.slow

DURABLEPROC = str(Path(__file__).with_name("durableproc.py"))
QUEUE = "jobs"  # the queue durableproc.py uses
SEEDS = [1, 2, 3]
FAULT_SECONDS = 4.5  # how long producers send and the nemesis acts
RATE = 150  # messages per second per producer
WINDOW = 32  # unconfirmed sends per producer
# Bounds for waits that take well under a second on a quiet machine (a
# process starting, a host restarting), and for the final drain; far above
# that so a busy machine passes too.
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 60.0
# A whole run: starts, FAULT_SECONDS of faults, the drain, and stopping.
RUN_TIMEOUT = 180


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail()}")
        time.sleep(0.02)


class Proc:
    """A child process whose stdout and stderr go to files in the test's tmp dir."""

    def __init__(self, name: str, argv: list[str], logs: Path) -> None:
        self.name = name
        self.out = logs / f"{name}.out"
        self.err = logs / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def said(self, text: str) -> bool:
        return text in self.out.read_text()

    def describe(self) -> str:
        return describe(self.name, self.popen.poll(), self.err, self.out)

    def wait_said(self, text: str, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if not self.alive and not self.said(text):
                raise AssertionError(f"exited before saying {text!r}\n{self.describe()}")
            return self.said(text)

        wait_for(ready, timeout, f"{self.name} to say {text!r}", self.describe)

    def kill(self) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class Cluster:
    """One durable host and its producers and workers, all started here.

    Every process has its own history file; the nemesis (this test process)
    records its kills and restarts in another.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.url = ""  # the first host binds any free port; restarts reuse it
        self.store = tmp / "queues.db"
        self.histories = tmp / "histories"
        self.histories.mkdir()
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.started: list[Proc] = []
        self.host: Proc | None = None
        self.producers: list[Proc] = []
        self.workers: list[Proc] = []
        self.host_starts = 0
        self._names: dict[str, int] = {}
        self.nemesis = HistoryWriter(self.histories / "nemesis.jsonl", process="nemesis")

    def _name(self, role: str) -> str:
        self._names[role] = self._names.get(role, 0) + 1
        return f"{role}-{self._names[role]}"

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.logs)
        self.started.append(proc)
        return proc

    # -- the host ----------------------------------------------------------

    def start_host(self) -> None:
        """Start the host on the same port and store; retries a refused bind,
        since the port of a just-killed host may take a moment to free (or be
        taken for a moment by another program)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.host_starts += 1
            host = self._spawn(
                f"host-{self.host_starts}",
                [
                    sys.executable,
                    "-m",
                    "pigeon.cli.main",
                    "node",
                    "--bind",
                    self.url or ANY_PORT,
                    "--store",
                    str(self.store),
                    "--heartbeat",
                    "0.2",
                ],
            )
            try:
                host.wait_said("pigeon node: serving")
            except AssertionError:
                host.kill()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
                continue
            if not self.url:
                banner = re.search(r"serving (tcp://\S+?);", host.out.read_text())
                assert banner, host.describe()
                self.url = banner.group(1)
            self.host = host
            return

    def kill_host(self) -> None:
        assert self.host is not None
        self.nemesis.nemesis("kill -9", self.host.name)
        self.host.kill()

    def restart_host(self) -> None:
        self.start_host()
        assert self.host is not None
        self.nemesis.nemesis("restart", self.host.name)

    # -- producers and workers ---------------------------------------------

    def _role(self, role: str, *options: str) -> Proc:
        name = self._name(role)
        return self._spawn(
            name,
            [
                sys.executable,
                DURABLEPROC,
                role,
                self.url,
                str(self.histories / f"{name}.jsonl"),
                name,
                *options,
            ],
        )

    def start_producer(self, count: int) -> Proc:
        proc = self._role("producer", f"--count={count}", f"--rate={RATE}", f"--window={WINDOW}")
        self.producers.append(proc)
        return proc

    def start_worker(self) -> Proc:
        proc = self._role("worker")
        self.workers.append(proc)
        return proc

    def kill(self, proc: Proc) -> None:
        self.nemesis.nemesis("kill -9", proc.name)
        proc.kill()
        for group in (self.producers, self.workers):
            if proc in group:
                group.remove(proc)

    # -- the end -------------------------------------------------------------

    def history_files(self) -> list[Path]:
        return sorted(self.histories.glob("*.jsonl"))

    def result(self) -> CheckResult:
        return check(load_history(self.history_files()))

    def drain(self) -> None:
        """Let the live producers finish, then wait until every confirmed
        send was delivered; bounded either way (the check reports what's left)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while not all(p.said("done") for p in self.producers) and time.monotonic() < deadline:
            time.sleep(0.1)
        while self.result().lost and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.nemesis.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


@dataclass
class Faults:
    """How many of each fault one run injects; times come from the seed."""

    host_kills: int = 0
    worker_kills: int = 0
    producer_kills: int = 0


def run(cluster: Cluster, seed: int, faults: Faults) -> CheckResult:
    rng = random.Random(seed)
    cluster.start_host()
    for _ in range(2):
        cluster.start_worker()
    for _ in range(2):
        cluster.start_producer(count=int(RATE * FAULT_SECONDS))
    for proc in cluster.workers + cluster.producers:
        proc.wait_said("ready")

    # The plan: (seconds into the run, fault), spread over the sending phase
    # but not at its very start or end.
    plan = [(rng.uniform(0.5, FAULT_SECONDS - 0.5), "host") for _ in range(faults.host_kills)]
    plan += [(rng.uniform(0.3, FAULT_SECONDS - 0.3), "worker") for _ in range(faults.worker_kills)]
    plan += [
        (rng.uniform(0.5, FAULT_SECONDS - 1.0), "producer") for _ in range(faults.producer_kills)
    ]
    started = time.monotonic()
    for at, fault in sorted(plan):
        time.sleep(max(0.0, started + at - time.monotonic()))
        if fault == "host":
            cluster.kill_host()
            time.sleep(rng.uniform(0.05, 0.5))  # down for a while: sends pile up
            cluster.restart_host()
        elif fault == "worker":
            cluster.kill(rng.choice(cluster.workers))
            time.sleep(rng.uniform(0.0, 0.3))
            cluster.start_worker().wait_said("ready")
        else:
            cluster.kill(rng.choice(cluster.producers))
            left = FAULT_SECONDS - (time.monotonic() - started)
            # A new producer (new id, its own seqs) sends what the dead one had left.
            cluster.start_producer(count=max(RATE // 2, int(RATE * left))).wait_said("ready")

    cluster.drain()
    return cluster.result()


def assert_no_loss(result: CheckResult, faults: Faults) -> None:
    summary = json.dumps(result.summary())
    detail = f"{result}\n{summary}"
    print(detail)
    faults_done = faults.host_kills * 2 + faults.worker_kills + faults.producer_kills
    assert result.counts["nemesis"] == faults_done, detail
    assert result.counts["acknowledged"] > 0, detail
    assert not result.lost, f"confirmed sends never delivered:\n{detail}"
    assert not result.unmarked_duplicates, f"duplicates not marked redelivered:\n{detail}"
    assert not result.unexpected, detail
    assert not result.corrupt, detail
    assert not result.order_inversions, f"per-producer order broken:\n{detail}"
    assert not result.redelivered_after_ack, detail
    assert result.valid, detail
    # Surviving producers waited for every confirm: only a killed producer's
    # window may be left unconfirmed, and nothing was refused.
    assert result.counts["failed"] == 0, detail
    assert result.counts["indeterminate"] <= WINDOW * faults.producer_kills, detail


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize("seed", SEEDS)
def test_host_killed_and_restarted(cluster: Cluster, seed: int) -> None:
    faults = Faults(host_kills=3)
    result = run(cluster, seed, faults)
    assert_no_loss(result, faults)


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize("seed", SEEDS)
def test_workers_killed_and_replaced(cluster: Cluster, seed: int) -> None:
    faults = Faults(worker_kills=4)
    result = run(cluster, seed, faults)
    assert_no_loss(result, faults)


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize("seed", SEEDS)
def test_producer_killed_and_replaced(cluster: Cluster, seed: int) -> None:
    faults = Faults(producer_kills=1)
    result = run(cluster, seed, faults)
    assert_no_loss(result, faults)


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize("seed", SEEDS)
def test_host_workers_and_producer_killed(cluster: Cluster, seed: int) -> None:
    faults = Faults(host_kills=2, worker_kills=3, producer_kills=1)
    result = run(cluster, seed, faults)
    assert_no_loss(result, faults)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_order_kept_when_a_lost_send_is_resent_after_host_restart(cluster: Cluster) -> None:
    """Per-producer order, which the history checker holds as an invariant,
    across a host restart: "1" reaches a host that dies before reading it, "2"
    is sent while the host is down; after the restart, "1" must come first."""
    cluster.start_host()
    assert cluster.host is not None

    async def scenario() -> list[tuple[bytes, bool]]:
        async with pigeon.connect(cluster.url, heartbeat=0.2) as producer:
            await producer.send(QUEUE, b"0", timeout=START_TIMEOUT)  # the link is up
            # Frozen, the host takes "1" into its socket buffer but never reads it.
            os.kill(cluster.host.popen.pid, signal.SIGSTOP)
            first = producer.send_nowait(QUEUE, b"1")
            await asyncio.sleep(0.2)
            cluster.kill_host()
            await wait_until(
                lambda: not producer.stats()["links"][cluster.url]["up"],
                START_TIMEOUT,
                "the link to drop",
            )
            second = producer.send_nowait(QUEUE, b"2")
            await asyncio.sleep(0.1)
            await asyncio.to_thread(cluster.restart_host)
            await asyncio.wait_for(asyncio.gather(first, second), START_TIMEOUT)

        got: list[tuple[bytes, bool]] = []
        async with pigeon.connect(cluster.url, heartbeat=0.2) as worker:
            await worker.consume(
                QUEUE, lambda d: got.append((d.message.body, d.message.redelivered))
            )
            await wait_until(lambda: len(got) >= 3, START_TIMEOUT, "all three messages")
        return got

    got = asyncio.run(scenario())
    # "0" was stored before the crash and comes back marked; "1" and "2"
    # were stored once each, after the restart, and never delivered before.
    assert (b"0", True) in got
    fresh = [body for body, redelivered in got if not redelivered]
    assert fresh == [b"1", b"2"], got
