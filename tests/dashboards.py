"""Processes the dashboard's tests run: a ``pigeon node``, the traffic of
``dashboardproc.py``, ``pigeon dashboard`` itself; and plain HTTP calls to
it. Each process is started by its real command line and read by its
banner line."""

from __future__ import annotations

import json
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from brokers import completed, describe

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
HERE = Path(__file__).parent
WAIT = 60.0  # bound for what takes a second on a quiet machine


class Process:
    """A child whose first stdout line says it is ready; stopped by SIGTERM."""

    def __init__(self, name: str, argv: list[str], logs: Path, *, stdin: bool = False) -> None:
        self.name = name
        self.err = logs / f"{name}-{time.monotonic_ns()}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.banner = self.line()

    def line(self, timeout: float = WAIT) -> str:
        """The next stdout line (an AssertionError naming the process if
        none comes in time)."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.stop(kill=True)
                raise AssertionError(f"no line within {timeout} s\n{self.describe()}")
        line = self.proc.stdout.readline()
        assert line, f"{self.name} ended\n{self.describe()}"
        return line

    def describe(self) -> str:
        return describe(
            self.name, self.proc.poll(), self.err, self.banner if hasattr(self, "banner") else ""
        )

    def stop(self, *, kill: bool = False) -> str:
        """Stop it (SIGTERM, or SIGKILL); its remaining stdout ("" when it
        was stopped before)."""
        if self.proc.stdout is None or self.proc.stdout.closed:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=WAIT)
        return out or ""


def start_node(logs: Path, bind: str = "tcp://127.0.0.1:0") -> tuple[Process, str]:
    """``pigeon node`` on any free port; the process and its URL."""
    node = Process("pigeon node", [*PIGEON, "node", "--bind", bind, "--heartbeat", "0.5"], logs)
    served = re.search(r"serving (tcp://\S+?);", node.banner)
    assert served, node.describe()
    return node, served.group(1)


def start_traffic(url: str, logs: Path) -> Process:
    """``dashboardproc.py`` against ``url``, once its traffic holds still."""
    traffic = Process(
        "traffic", [sys.executable, str(HERE / "dashboardproc.py"), url], logs, stdin=True
    )
    assert traffic.banner.strip() == "ready", traffic.describe()
    return traffic


class Dashboard(Process):
    """``pigeon dashboard URL --port 0``: its address and token."""

    def __init__(self, url: str, logs: Path, *options: str) -> None:
        argv = [*PIGEON, "dashboard", url, "--port", "0", "--interval", "0.3", *options]
        super().__init__("pigeon dashboard", argv, logs)
        found = re.search(r"serving (http://\S+?/)(?:#token=(\S+))? for ", self.banner)
        assert found, self.describe()
        self.address = found.group(1)
        self.token = found.group(2) or ""


def queues_json(url: str) -> dict[str, Any]:
    """``pigeon queues URL --json``'s queues."""
    done = subprocess.run(
        [*PIGEON, "queues", url, "--json"], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, completed(done)
    queues: dict[str, Any] = json.loads(done.stdout)["queues"]
    return queues


def http(
    address: str,
    path: str,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request to the dashboard (a POST when there is a body): its
    status and its JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address.rstrip("/") + path, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
