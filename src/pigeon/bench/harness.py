"""Process plumbing shared by every benchmark: children, ports, probes, shapes.

Each benchmark *shape* (queue, rpc, backlog) is run the same way for every
system, so that the only thing that differs between two rows of a table is the
code under test.  A system plugs in small top-level child functions (they must
be importable by name because children are started with the ``spawn`` start
method) and the shape functions here start, time, and clean them up.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import os
import queue as queue_mod
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psutil

# spawn: a fork of a process that already holds sockets or an event loop is
# not a fair (or safe) starting point for a benchmark child.
CTX = mp.get_context("spawn")

# Seconds a child gets on top of the measuring time before it is killed.
GRACE_S = 30.0

T = TypeVar("T")


class Skip(Exception):
    """Raised by a variant that cannot run; the message becomes the reason."""


# Bind here and read the port back: nothing can take it between pick and bind.
ANY_PORT = "tcp://127.0.0.1:0"
_PORT_CLASH = (os.strerror(errno.EADDRINUSE), "EADDRINUSE")


def port_of(endpoint: str) -> int:
    """The port of a bound endpoint such as ``tcp://127.0.0.1:41234``."""
    return int(endpoint.rpartition(":")[2])


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Only for a port that must be known before anything binds it (the raw
    backlog, whose sender connects before its receiver binds): someone else
    may take it meanwhile, so such a run goes through :func:`retry_on_port_clash`.
    Everything else binds :data:`ANY_PORT` and reads the port back.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_clash(text: object) -> bool:
    """Does this error text say a bind was refused because the port was taken?"""
    return any(mark in str(text) for mark in _PORT_CLASH)


def retry_on_port_clash(run: Callable[[], T], attempts: int = 3) -> T:
    """Call ``run`` (which picks its ports afresh each time) again while it is
    skipped because a port picked ahead was taken before the bind."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except Skip as exc:
            if attempt == attempts or not port_clash(exc):
                raise
    raise AssertionError("unreachable")


def probe(url: str, timeout: float = 1.0) -> None:
    """Check that a server accepts TCP connections.

    Args:
        url: A ``nats://``, ``amqp://`` or ``redis://`` URL.
        timeout: Connect timeout in seconds.

    Raises:
        Skip: If the server is not reachable; the reason names the URL.
    """
    parts = urlsplit(url)
    default = {"nats": 4222, "amqp": 5672, "redis": 6379}.get(parts.scheme, 0)
    host, port = parts.hostname or "127.0.0.1", parts.port or default
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise Skip(f"server not reachable at {host}:{port}: {exc}") from None


@dataclass(frozen=True)
class NodeProcess:
    """A running standalone ``pigeon node``: where it serves, and its pid."""

    url: str
    pid: int


_BANNER = re.compile(r"serving (tcp://\S+?)[;,]")


@contextlib.contextmanager
def pigeon_node(*options: str) -> Iterator[NodeProcess]:
    """Run ``pigeon node --bind`` on a loopback port of its own for the block.

    The node is the program a user starts (``python -m pigeon.cli.main
    node``), not a function in a child: it is what the rows that use it
    measure. Its banner says the port it got. Its stdout and stderr go to
    files, so a node that does not start is skipped with the end of its
    stderr; it is stopped by pid (SIGTERM, then SIGKILL) when the block ends.

    Args:
        options: More ``pigeon node`` options, such as ``--store PATH``.
    """
    command = [sys.executable, "-m", "pigeon.cli.main", "node", "--bind", ANY_PORT, *options]
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-node-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(command, stdout=out, stderr=err)
        try:
            yield NodeProcess(_node_url(proc, out_path, err_path), proc.pid)
        finally:
            _stop_node(proc)
            if text := _read(err_path).strip():
                print(f"\n[bench pigeon node pid {proc.pid}]\n{text}", file=sys.stderr)


def _node_url(proc: subprocess.Popen[bytes], out_path: str, err_path: str) -> str:
    """The URL in the node's banner, once it has printed it."""
    deadline = time.monotonic() + GRACE_S
    while not (found := _BANNER.search(_read(out_path))):
        if proc.poll() is not None:
            lines = [line.strip() for line in _read(err_path).splitlines() if line.strip()]
            raise Skip(f"pigeon node exited {proc.returncode}: {' | '.join(lines[-3:])}")
        if time.monotonic() > deadline:
            raise Skip(f"pigeon node printed no banner within {GRACE_S:.0f} s")
        time.sleep(0.01)
    return found.group(1)


def _stop_node(proc: subprocess.Popen[bytes]) -> None:
    # SIGTERM lets a durable node commit what is pending and close its store.
    proc.terminate()
    try:
        proc.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(GRACE_S)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[idx]


def find_server_pid(name: str) -> int | None:
    """Pid of a running server process by executable name, if visible."""
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == name:
            pid: int = proc.pid
            return pid
    return None


class RssSampler:
    """Samples a process's RSS from a thread and keeps the peak.

    Polling from outside keeps the measured process free of any sampling code;
    at 10 ms the sampler misses only very short spikes.
    """

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self.first = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.first = self._proc.memory_info().rss
        self.peak = self.first
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except psutil.Error:
                return


@dataclass
class Ctl:
    """Shared state handed to every child of one run (picklable under spawn)."""

    n_workers: int
    cfg: dict[str, Any]
    bound: Any = field(default_factory=CTX.Event)  # producer/server is listening
    stop: Any = field(default_factory=CTX.Event)  # parent: everyone finish now
    done: Any = field(default_factory=CTX.Event)  # producer finished sending
    ready: Any = field(default_factory=lambda: CTX.Value("i", 0))  # workers ready
    port: Any = field(default_factory=lambda: CTX.Value("i", 0, lock=False))  # bound port
    sent: Any = field(default_factory=lambda: CTX.Value("q", 0, lock=False))
    t0: Any = field(default_factory=lambda: CTX.Value("d", 0.0, lock=False))
    counts: Any = None  # per-worker delivered count
    last: Any = None  # per-worker perf_counter() of the last delivery
    results: Any = field(default_factory=CTX.Queue)  # free-form dicts to parent

    def __post_init__(self) -> None:
        self.counts = CTX.Array("q", max(1, self.n_workers), lock=False)
        self.last = CTX.Array("d", max(1, self.n_workers), lock=False)

    def worker_ready(self) -> None:
        """Called by a worker once it is connected and consuming."""
        with self.ready.get_lock():
            self.ready.value += 1

    def wait_workers(self, timeout: float = GRACE_S) -> None:
        """Called by a producer: block until every worker is consuming."""
        deadline = time.monotonic() + timeout
        while self.ready.value < self.n_workers:
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not become ready")
            time.sleep(0.01)


def _child_main(target: Callable[..., Any], stderr_path: str, *args: Any) -> None:
    """Run ``target`` in a child with its stderr (fd 2) going to ``stderr_path``.

    Everything the child writes there (the traceback of a crash, a libzmq
    assertion) is read back by the parent, which reports it with the failure.
    """
    sys.stderr.flush()
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    target(*args)


class Children:
    """Starts child processes and guarantees each is joined or killed by pid.

    Each child's stderr goes to a file of its own: a child that fails is
    reported with the end of what it wrote, and whatever any child wrote is
    copied to the parent's stderr when the children are finished.
    """

    # Lines of a failed child's stderr quoted in the failure reason.
    TAIL_LINES = 3

    def __init__(self, ctl: Ctl) -> None:
        self.ctl = ctl
        self.procs: list[mp.process.BaseProcess] = []
        self._stderr: dict[int, str] = {}  # index in procs -> file
        self._tmp = tempfile.TemporaryDirectory(prefix="pigeon-bench-")

    def start(self, target: Callable[..., Any], *args: Any) -> mp.process.BaseProcess:
        path = os.path.join(self._tmp.name, f"child-{len(self.procs)}.stderr")
        proc = CTX.Process(target=_child_main, args=(target, path, *args), daemon=True)
        proc.start()
        self._stderr[len(self.procs)] = path
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        # On an error path children may be waiting on each other: tell them to
        # stop, give them a moment, then terminate by pid.
        self.ctl.stop.set()
        self.finish(timeout=5.0)
        for i, proc in enumerate(self.procs):
            if text := self.stderr(i).strip():
                print(f"\n[bench child pid {proc.pid}]\n{text}", file=sys.stderr)
        self._tmp.cleanup()

    def finish(self, timeout: float) -> None:
        """Join every child; terminate, then kill, whoever overstays."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, 9)
                proc.join(2.0)

    def stderr(self, i: int) -> str:
        """What child ``i`` (in start order) has written to its stderr so far."""
        try:
            with open(self._stderr[i], encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def failed(self) -> list[str]:
        """Describe children that exited with an error: the end of their stderr,
        or the reason they reported if they wrote nothing."""
        bad = []
        quoted = False
        for i, proc in enumerate(self.procs):
            if proc.exitcode in (0, None):
                continue
            lines = [line.strip() for line in self.stderr(i).splitlines() if line.strip()]
            tail = " | ".join(lines[-self.TAIL_LINES :])
            quoted = quoted or bool(tail)
            bad.append(f"pid {proc.pid} exit {proc.exitcode}" + (f": {tail}" if tail else ""))
        if bad and not quoted:
            try:
                while True:
                    item = self.ctl.results.get_nowait()
                    if "error" in item:
                        bad.append(item["error"])
            except (queue_mod.Empty, OSError, ValueError):
                pass
        return bad

    def failure(self, reported: str, wait: float = 2.0) -> str:
        """A child reported ``reported`` and is exiting: its description with
        its stderr once it has exited (at most ``wait`` seconds), else ``reported``."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if bad := self.failed():
                return ", ".join(bad)
            time.sleep(0.01)
        return reported


@contextlib.contextmanager
def reporting(ctl: Ctl) -> Iterator[None]:
    """Wrap a child's body: report an exception to the parent, then exit non-zero."""
    try:
        yield
    except BaseException as exc:  # the parent must learn why, whatever it was
        ctl.results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


class Tally:
    """A worker's local delivery count; published to the parent by the poller."""

    __slots__ = ("n", "last")

    def __init__(self) -> None:
        self.n = 0
        self.last = 0.0

    def publish(self, ctl: Ctl, i: int) -> None:
        """Copy the count into the shared arrays (last first, so it is never stale)."""
        ctl.last[i] = self.last
        ctl.counts[i] = self.n


async def publish_until_stop(ctl: Ctl, i: int, tally: Tally) -> None:
    """Async workers: publish the tally every 10 ms until the parent says stop.

    Publishing from a timer rather than per message keeps shared-memory writes
    off the delivery path.
    """

    def publish_and_check() -> bool:
        tally.publish(ctl, i)
        return bool(ctl.stop.is_set())

    await poll_until(publish_and_check)
    tally.publish(ctl, i)


async def poll_until(pred: Callable[[], bool], limit_s: float = 10 * GRACE_S) -> None:
    """Await a condition on cross-process state by polling every 10 ms.

    The state lives in shared memory written by other processes, so there is
    no asyncio.Event to await; polling keeps the event loop free meanwhile.
    """
    import asyncio

    deadline = time.monotonic() + limit_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark peer did not respond in time")
        await asyncio.sleep(0.01)


async def wait_workers_async(ctl: Ctl) -> None:
    """Async producers: wait until every worker is consuming."""
    await poll_until(lambda: ctl.ready.value >= ctl.n_workers, GRACE_S)


async def wait_stop(ctl: Ctl) -> None:
    """Async producers/servers: idle until the parent says stop."""
    await poll_until(ctl.stop.is_set)
