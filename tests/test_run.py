"""``pigeon run`` as a user runs it: real supervisors, app processes and a
``pigeon node`` (or a broker) as subprocesses. The docs' example app
(``examples/app/shop.py``) is the app wherever it fits; the drain, reload
and import tests write small apps of their own."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import AMQP_URL, ANY_PORT, NATS_URL, completed, describe, require
from test_cli_node import Node, start_node

import pigeon
import pigeon.sync

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
REPO = Path(__file__).parent.parent
SHOP = REPO / "examples" / "app" / "shop.py"
CLIENT = REPO / "examples" / "app" / "client.py"
WAIT = 60.0  # bound for what takes a second or two on a quiet machine

STARTED = re.compile(r"process (\d+) \(pid (\d+)\) started")
READY = re.compile(r"process (\d+) \(pid (\d+)\) ready")


class Run:
    """``pigeon run ARGS`` in ``cwd`` (default ``logs``), its stderr (the log)
    and stdout in files in ``logs``."""

    def __init__(
        self,
        logs: Path,
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        stamp = time.monotonic_ns()
        self.err = logs / f"run-{stamp}.err"
        self.out = logs / f"run-{stamp}.out"
        with open(self.err, "wb") as err, open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [*PIGEON, "run", *args],
                cwd=cwd or logs,
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
            )

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def describe(self) -> str:
        return describe("pigeon run", self.proc.poll(), self.err, self.out)

    def pids(self) -> dict[int, int]:
        """The latest pid of each slot, from the log."""
        return {int(slot): int(pid) for slot, pid in STARTED.findall(self.log())}

    def ready(self, count: int = 1) -> None:
        """Wait until ``count`` processes have started the app."""
        self.wait_log(lambda log: len(READY.findall(log)) >= count, f"{count} ready")

    def wait_log(self, predicate: Callable[[str], bool], what: str) -> None:
        wait_for(lambda: predicate(self.log()) or self.proc.poll() is not None, what, self)
        assert predicate(self.log()), f"pigeon run ended before {what}\n{self.describe()}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
            raise AssertionError(f"pigeon run did not stop\n{self.describe()}") from None

    def ensure_stopped(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        for pid in self.pids().values():  # app processes left behind by a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(predicate: Callable[[], bool], what: str, run: Run | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() >= deadline:
            detail = f"\n{run.describe()}" if run is not None else ""
            raise AssertionError(f"timed out after {WAIT} s waiting for {what}{detail}")
        time.sleep(0.05)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    started = start_node(ANY_PORT, str(tmp_path / "node.db"), tmp_path)
    try:
        yield started
    finally:
        if started.proc.poll() is None:
            started.stop()


def collect(conn: pigeon.sync.Connection, queue_name: str) -> queue.Queue[Any]:
    """Every message of ``queue_name``, decoded, in a queue."""
    got: queue.Queue[Any] = queue.Queue()
    conn.consume(queue_name, lambda delivery: got.put(delivery.decode()))
    return got


def take(got: queue.Queue[Any], count: int, what: str, run: Run) -> list[Any]:
    items = []
    deadline = time.monotonic() + WAIT
    while len(items) < count:
        try:
            items.append(got.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(
                f"{what}: {len(items)} of {count} after {WAIT} s\n{run.describe()}"
            ) from None
    return items


def place_orders(conn: pigeon.sync.Connection, count: int) -> set[str]:
    batch = uuid.uuid4().hex[:8]
    ids = {f"{batch}-{n}" for n in range(count)}
    for order in sorted(ids):
        conn.send("shop.orders", {"id": order, "item": "pear", "quantity": 2})
    return ids


def invoiced(got: queue.Queue[Any], ids: set[str], run: Run) -> None:
    """Wait until every order in ``ids`` has its invoice (duplicates allowed:
    delivery is at least once)."""
    seen: set[str] = set()
    deadline = time.monotonic() + WAIT
    while not ids <= seen:
        try:
            invoice = got.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            missing = sorted(ids - seen)
            raise AssertionError(
                f"{len(missing)} orders never invoiced, e.g. {missing[:5]}\n{run.describe()}"
            ) from None
        assert invoice["total"] == 1.5, invoice
        seen.add(invoice["order"])


# -- the docs' app -------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """The samples at a Prometheus endpoint: ``name{labels}`` to value."""
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with these labels (and any others)."""
    total = 0.0
    for key, value in samples.items():
        family, _, rest = key.partition("{")
        if family == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def readme_command(prefix: str) -> list[str]:
    """The words of the README's command line that starts with ``prefix``
    (without a trailing ``&`` or comment)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run an app", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            if line.startswith(prefix):
                return line.partition("#")[0].strip().removesuffix("&").split()
    raise AssertionError(f"the README shows no {prefix!r} in 'Run an app'")


def test_the_docs_show_the_example_app_as_it_is() -> None:
    shop, client = SHOP.read_text(), CLIENT.read_text()
    readme = (REPO / "README.md").read_text()
    apps = (REPO / "docs" / "apps.md").read_text()
    assert shop in re.findall(r"```py\n(.*?)```", readme, flags=re.S)
    assert re.findall(r"```py\n(.*?)```", apps, flags=re.S)[:2] == [shop, client]
    assert readme_command("python") == ["python", "examples/app/client.py"]


@pytest.mark.timeout(300)
def test_the_docs_app_in_two_processes_serves_metrics_that_count_its_messages(
    tmp_path: Path, node: Node
) -> None:
    # As the README runs it, on the test's node and on any free port.
    command = readme_command("pigeon run")
    assert command[:2] == ["pigeon", "run"] and "--metrics-port" in command
    command[command.index("--metrics-port") + 1] = "0"
    run = Run(tmp_path, *command[2:], "--url", node.url, cwd=REPO)
    try:
        run.ready(2)
        found = re.search(r"metrics of every process on (http://\S+)", run.log())
        assert found, run.describe()
        endpoint = found.group(1)
        with pigeon.sync.connect(node.url, heartbeat=0.5) as conn:
            invoices = collect(conn, "shop.invoices")
            invoiced(invoices, place_orders(conn, 20), run)
            assert conn.request("shop.price", "apple", timeout=WAIT).decode() == 0.5

        def counted() -> bool:
            samples = scrape(endpoint)
            return (
                sample(samples, "pigeon_messages_handled_total", queue="shop.orders") >= 20
                and sample(samples, "pigeon_requests_served_total", service="shop.price") >= 1
            )

        wait_for(counted, "the metrics", run)
        samples = scrape(endpoint)
        # Each order was handled once, by one of the two processes, and sent
        # one invoice: the endpoint sums what both counted.
        handled = sample(samples, "pigeon_messages_handled_total", queue="shop.orders")
        assert handled == 20, samples
        acked = sample(
            samples, "pigeon_messages_handled_total", queue="shop.orders", outcome="acked"
        )
        assert acked == 20
        assert sample(samples, "pigeon_messages_sent_total", queue="shop.invoices") == 20
        assert sample(samples, "pigeon_handler_seconds_count", queue="shop.orders") == 20
        assert sample(samples, "pigeon_published_total", topic="shop.taken.pear") == 20
        assert sample(samples, "pigeon_requests_served_total", outcome="ok") == 1
        assert run.stop() == 0, run.describe()
    finally:
        run.ensure_stopped()


@pytest.mark.timeout(300)
def test_a_killed_app_process_is_restarted_and_no_order_is_lost(tmp_path: Path, node: Node) -> None:
    run = Run(tmp_path, str(SHOP), "--workers", "2", "--url", node.url, "--grace", "5")
    try:
        run.ready(2)
        with pigeon.sync.connect(node.url, heartbeat=0.5) as conn:
            invoices = collect(conn, "shop.invoices")
            first = place_orders(conn, 30)
            victim = run.pids()[0]
            os.kill(victim, signal.SIGKILL)
            run.wait_log(lambda log: "restarting process 0" in log, "the restart to be planned")
            run.wait_log(lambda log: run.pids()[0] != victim, "process 0 to start again")
            run.ready(3)
            invoiced(invoices, first, run)
            then = place_orders(conn, 30)
            invoiced(invoices, then, run)
        assert "ended by SIGKILL" in run.log()
        assert run.stop() == 0, run.describe()
    finally:
        run.ensure_stopped()


@pytest.mark.timeout(300)
def test_the_docs_client_runs_against_the_app_found_through_pigeon_url(
    tmp_path: Path, node: Node
) -> None:
    run = Run(tmp_path, str(SHOP), "--concurrency", "4", env={"PIGEON_URL": node.url})
    try:
        run.ready()
        client = subprocess.run(
            [sys.executable, str(CLIENT), node.url],
            capture_output=True,
            text=True,
            timeout=2 * WAIT,
        )
        assert client.returncode == 0, completed(client) + run.describe()
        assert "a pear costs 0.75" in client.stdout
        for line in ("order-1 total 0.5", "order-2 total 1.5", "order-3 total 1.2"):
            assert line in client.stdout, completed(client)
        wait_for(lambda: run.out.read_text().count("taken order-") >= 3, "the ledger", run)
        assert run.stop(signal.SIGINT) == 0, run.describe()
        assert "drained and stopped" in run.log()
    finally:
        run.ensure_stopped()


@pytest.mark.broker
@pytest.mark.timeout(300)
@pytest.mark.parametrize("url", [NATS_URL, AMQP_URL], ids=["nats", "amqp"])
def test_the_docs_app_runs_on_a_broker(tmp_path: Path, url: str) -> None:
    require(url)
    run = Run(tmp_path, str(SHOP), "--workers", "2", "--url", url)
    try:
        run.ready(2)
        with pigeon.sync.connect(url) as conn:
            invoices = collect(conn, "shop.invoices")
            invoiced(invoices, place_orders(conn, 20), run)
            assert conn.request("shop.price", "plum", timeout=WAIT).decode() == 0.4
        assert "***" in run.log() or "@" not in url  # the password is not logged
        for pid in run.pids().values():  # nor shown to ps
            assert url not in Path(f"/proc/{pid}/cmdline").read_text()
        assert run.stop() == 0, run.describe()
    finally:
        run.ensure_stopped()


# -- stopping ------------------------------------------------------------------

SLOW_APP = """
    import asyncio
    import os

    import pigeon

    app = pigeon.App("tcp://127.0.0.1:9")  # the test gives --url

    @app.worker("slow")
    async def slow(n: int) -> None:
        assert app.connection is not None
        await app.connection.send("started", n)
        while not os.path.exists({release!r}):
            await asyncio.sleep(0.02)
        await app.connection.send("finished", n)
"""


@pytest.mark.timeout(300)
def test_sigterm_drains_handlers_in_flight_and_hands_back_the_rest(
    tmp_path: Path, node: Node
) -> None:
    release = tmp_path / "release"
    (tmp_path / "slowapp.py").write_text(textwrap.dedent(SLOW_APP.format(release=str(release))))
    run = Run(tmp_path, "slowapp", "--concurrency", "2", "--url", node.url, "--grace", "50")
    try:
        with pigeon.sync.connect(node.url, heartbeat=0.5) as conn:
            started = collect(conn, "started")
            finished = collect(conn, "finished")
            for n in range(3):
                conn.send("slow", n)
            # Nothing finishes before the release: two ran at once.
            running = sorted(take(started, 2, "handlers started", run))
            run.proc.send_signal(signal.SIGTERM)
            run.wait_log(lambda log: "draining" in log, "the drain")
            release.touch()
            assert sorted(take(finished, 2, "handlers finished", run)) == running
            assert run.proc.wait(WAIT) == 0, run.describe()
            assert "drained and stopped" in run.log()
            # The one that never started was handed back, not lost.
            left = collect(conn, "slow")
            (rest,) = take(left, 1, "the handed-back message", run)
            assert sorted([*running, rest]) == [0, 1, 2]
    finally:
        run.ensure_stopped()


@pytest.mark.timeout(300)
def test_a_second_interrupt_kills_at_once(tmp_path: Path, node: Node) -> None:
    release = tmp_path / "never"
    (tmp_path / "slowapp.py").write_text(textwrap.dedent(SLOW_APP.format(release=str(release))))
    run = Run(tmp_path, "slowapp", "--url", node.url, "--grace", "600")
    try:
        with pigeon.sync.connect(node.url, heartbeat=0.5) as conn:
            started = collect(conn, "started")
            conn.send("slow", 1)
            take(started, 1, "the handler", run)
            run.proc.send_signal(signal.SIGINT)
            run.wait_log(lambda log: "draining" in log, "the drain")
            assert run.stop(signal.SIGINT) == 130, run.describe()
        assert "killing every app process" in run.log()
        assert "ended by SIGKILL" in run.log()
    finally:
        run.ensure_stopped()


@pytest.mark.timeout(300)
def test_app_processes_whose_supervisor_is_killed_drain_and_stop(
    tmp_path: Path, node: Node
) -> None:
    run = Run(tmp_path, str(SHOP), "--workers", "2", "--url", node.url)
    try:
        run.ready(2)
        pids = list(run.pids().values())
        run.proc.kill()
        run.proc.wait(WAIT)

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            # A zombie is gone too: its parent, the supervisor, is dead, and
            # init reaps it soon after.
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return stat.read().split(") ", 1)[1].startswith("Z")
            except FileNotFoundError:
                return True

        wait_for(lambda: all(gone(pid) for pid in pids), "the orphans to stop", run)
        assert run.log().count("the supervisor is gone: draining") == 2, run.describe()
    finally:
        run.ensure_stopped()


# -- an app that cannot load ---------------------------------------------------


def run_at_once(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``pigeon run ARGS``, expected to end by itself at once (a refusal)."""
    return subprocess.run(
        [*PIGEON, "run", *args], cwd=cwd, capture_output=True, text=True, timeout=WAIT
    )


BROKEN = {
    "nosuchmodule": ("", "no module named 'nosuchmodule'"),
    "good:nosuch": ("import pigeon\napp = pigeon.App('memory://x')\n", "no attribute 'nosuch'"),
    "good:number": ("number = 7\n", "good.number is a int, not a pigeon.App"),
    "good": ("import missing_dependency_x\n", "No module named 'missing_dependency_x'"),
    "good:app": ("raise ValueError('bad config')\n", "raised ValueError: bad config"),
    "not a module": ("", "expected MODULE:ATTR"),
}


@pytest.mark.parametrize("reference", list(BROKEN))
def test_an_app_that_cannot_load_ends_at_once_with_one_line(tmp_path: Path, reference: str) -> None:
    source, message = BROKEN[reference]
    (tmp_path / "good.py").write_text(source)
    done = run_at_once(reference, "--workers", "3", cwd=tmp_path)
    assert done.returncode == 2, completed(done)
    assert message in done.stderr, completed(done)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, completed(done)
    assert "started" not in done.stderr  # no process was started


def test_the_traceback_is_shown_at_debug(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text("raise ValueError('bad config')\n")
    done = run_at_once("good", "--log-level", "DEBUG", cwd=tmp_path)
    assert done.returncode == 2, completed(done)
    assert "Traceback" in done.stderr and "bad config" in done.stderr, completed(done)


def test_a_url_no_transport_speaks_ends_it_without_restarts(tmp_path: Path) -> None:
    done = run_at_once(str(SHOP), "--url", "bogus://x", "--workers", "2")
    assert done.returncode == 2, completed(done)
    assert "bogus" in done.stderr and "restarting" not in done.stderr, completed(done)


@pytest.mark.parametrize("bind", ["'tcp://127.0.0.1:0'", "['ipc:///tmp/x', 'tcp://127.0.0.1:0']"])
def test_more_than_one_process_of_an_app_that_binds_is_refused(tmp_path: Path, bind: str) -> None:
    (tmp_path / "serving.py").write_text(f"import pigeon\napp = pigeon.App(bind={bind})\n")
    done = run_at_once("serving", "--workers", "2", cwd=tmp_path)
    assert done.returncode == 2, completed(done)
    assert "'--workers'" in done.stderr and "tcp://127.0.0.1:0" in done.stderr, completed(done)
    assert "--workers 1" in done.stderr and "pigeon node" in done.stderr, completed(done)
    assert "started" not in done.stderr and "Traceback" not in done.stderr, completed(done)


# -- reload ----------------------------------------------------------------------

VERSIONED_APP = """
    import pigeon

    app = pigeon.App("tcp://127.0.0.1:9")

    @app.service("version")
    def version(_: object) -> str:
        return {version!r}
"""


@pytest.mark.timeout(300)
def test_reload_restarts_the_app_when_its_code_changes(tmp_path: Path, node: Node) -> None:
    code = tmp_path / "app" / "versioned.py"
    code.parent.mkdir()
    code.write_text(textwrap.dedent(VERSIONED_APP.format(version="one")))
    run = Run(tmp_path, str(code), "--reload", "--url", node.url, "--grace", "5")

    def answers(conn: pigeon.sync.Connection, expected: str) -> Callable[[], bool]:
        def ask() -> bool:
            try:
                return bool(conn.request("version", None, timeout=2).decode() == expected)
            except pigeon.PigeonError:
                return False  # between two processes: nobody serves it

        return ask

    try:
        run.wait_log(lambda log: "reloading when a .py file" in log, "the watch")
        with pigeon.sync.connect(node.url, heartbeat=0.5) as conn:
            wait_for(answers(conn, "one"), "version one", run)
            code.write_text(textwrap.dedent(VERSIONED_APP.format(version="two")))
            wait_for(answers(conn, "two"), "version two", run)
            assert "files changed" in run.log()
            code.write_text("this is not python\n")  # a broken save: waits for the next
            run.wait_log(lambda log: "cannot load the app" in log, "the broken save")
            code.write_text(textwrap.dedent(VERSIONED_APP.format(version="three")))
            wait_for(answers(conn, "three"), "version three", run)
        assert run.stop() == 0, run.describe()
    finally:
        run.ensure_stopped()


# -- in process: the app reference and App.configure ---------------------------------


def test_an_app_reference_names_a_module_or_a_file(tmp_path: Path) -> None:
    from pigeon.cli.load import AppNotLoaded, parse_reference

    dotted = parse_reference("shop.orders:billing", str(tmp_path))
    assert (dotted.module, dotted.attribute, dotted.directory) == (
        "shop.orders",
        "billing",
        str(tmp_path),
    )
    assert parse_reference("shop", str(tmp_path)).attribute == "app"
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "shop.py").write_text("")
    by_path = parse_reference("apps/shop.py", str(tmp_path))
    assert (by_path.module, by_path.directory) == ("shop", str(tmp_path / "apps"))
    for bad in ("shop:9", "apps/none.py", "my-app", ":app", "apps/my-shop.py"):
        with pytest.raises(AppNotLoaded):
            parse_reference(bad, str(tmp_path))


def test_configure_moves_the_app_and_sets_the_default_concurrency() -> None:
    app = pigeon.App("tcp://127.0.0.1:9")  # nobody there: configure moves it
    app.configure(url="memory://configured", concurrency=3)

    @app.worker("default")
    async def by_default(body: object) -> None: ...

    @app.worker("own", concurrency=2)
    async def own(body: object) -> None: ...

    async def scenario() -> None:
        conn = await app.start()
        try:
            assert conn.transport.url == "memory://configured"
            workers = {w.queue: w.concurrency for w in conn._workers}
            assert workers == {"default": 3, "own": 2}
        finally:
            await app.stop()

    asyncio.run(scenario())
    for bad in (0, True, 1.5):
        with pytest.raises(pigeon.ConfigurationError):
            app.configure(concurrency=bad)  # type: ignore[arg-type]
