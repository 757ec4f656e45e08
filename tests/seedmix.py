"""Real processes for the seed-mix tests: started with their output in files,
polled with generous deadlines, and all killed by PID at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from brokers import describe

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed"
PY = sys.executable
PIGEON = [PY, "-m", "pigeon.cli.main"]


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / f"{name}.out", "wb")
        err = open(self.tmp / f"{name}.err", "wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT)
        out.close()
        err.close()
        self.started[name] = proc
        return proc

    def lines(self, name: str) -> list[str]:
        try:
            return (self.tmp / f"{name}.out").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def report(self) -> str:
        return "\n".join(
            describe(name, p.poll(), self.tmp / f"{name}.err", self.tmp / f"{name}.out")
            for name, p in self.started.items()
        )

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout} s\n{self.report()}")
            time.sleep(0.1)

    def stop(self, name: str, timeout: float = 30.0) -> int:
        proc = self.started[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not stop on SIGTERM\n{self.report()}") from None

    def kill_all(self) -> None:
        for proc in self.started.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
