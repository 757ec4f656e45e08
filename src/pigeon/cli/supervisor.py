"""The supervisor of ``pigeon run``: starts the app processes, tells the
decisions core (``pigeon._core.supervise``) what they do, and does what it
decides: start, SIGTERM, SIGKILL, exit.

Each app process runs in its own process group, so a Ctrl-C at the terminal
reaches the supervisor alone: it forwards the first as SIGTERM (drain) and
answers the second with SIGKILL, instead of every process hearing both.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from .._core.supervise import (
    EXIT_CANNOT_LOAD,
    Action,
    Exit,
    Kill,
    Restarting,
    SlotState,
    Start,
    Supervision,
    Terminate,
)
from .app_process import TASK_ENV

log = logging.getLogger("pigeon.run")

# How often exits are looked for: a process's exit is seen within this.
POLL = 0.1

STOP = "stop"
RELOAD = "reload"


class Supervisor:
    """Runs ``supervision.workers`` app processes of ``task`` (see
    :func:`pigeon.cli.app_process.spec`) until it decides to exit.

    ``on_exit(pid)`` is told of every process that ended (the metrics
    endpoint forgets its live gauges); ``env`` is the processes'
    environment.
    """

    def __init__(
        self,
        task: dict[str, Any],
        supervision: Supervision,
        *,
        env: dict[str, str],
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.task = task
        self.core = supervision
        self.env = env
        self.on_exit = on_exit
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lifeline_read, self._lifeline_write = os.pipe()

    def request(self, event: str) -> None:
        """Ask for a stop or a reload; safe from a signal handler or a thread
        (``SimpleQueue.put`` is reentrant)."""
        self.events.put(event)

    def run(self) -> int:
        """Supervise until every process has exited; returns the exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            code = self._do(self.core.start(time.monotonic()))
            while code is None:
                code = self._step()
            return code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for proc in self._procs.values():  # only on an error of our own
                proc.kill()
            os.close(self._lifeline_read)
            os.close(self._lifeline_write)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request(STOP)

    def _step(self) -> int | None:
        now = time.monotonic()
        wait = max(0.0, min(POLL, self.core.next_due() - now))
        try:
            event = self.events.get(timeout=wait)
        except queue.Empty:
            event = None
        now = time.monotonic()
        code: int | None = None
        if event == STOP:
            if self.core.stopping:
                log.warning("stopping now: killing every app process")
            else:
                log.info("draining (up to %g s)", self.core.grace)
            code = self._do(self.core.stop(now))
        elif event == RELOAD:
            log.info("files changed: restarting the app processes")
            code = self._do(self.core.reload(now))
        for slot, proc in list(self._procs.items()):
            returncode = proc.poll()
            if returncode is not None:
                del self._procs[slot]
                self._exited(slot, proc, returncode, self.core.state(slot) is SlotState.STOPPING)
                code = _first(code, self._do(self.core.exited(slot, returncode, time.monotonic())))
        return _first(code, self._do(self.core.poll(time.monotonic())))

    def _exited(
        self, slot: int, proc: subprocess.Popen[bytes], returncode: int, asked: bool
    ) -> None:
        if self.on_exit is not None:
            self.on_exit(proc.pid)
        fields = {"slot": slot, "pid": proc.pid, "exit_code": returncode}
        if asked and returncode == 0:
            log.info("process %d (pid %d) drained and stopped", slot, proc.pid, extra=fields)
        elif returncode == EXIT_CANNOT_LOAD:
            log.error(
                "process %d (pid %d) cannot load the app: not restarted",
                slot,
                proc.pid,
                extra=fields,
            )
        elif returncode < 0:
            name = signal.Signals(-returncode).name
            log.warning("process %d (pid %d) was ended by %s", slot, proc.pid, name, extra=fields)
        else:
            log.warning(
                "process %d (pid %d) exited with code %d", slot, proc.pid, returncode, extra=fields
            )

    def _do(self, actions: list[Action]) -> int | None:
        code: int | None = None
        for action in actions:
            if isinstance(action, Start):
                code = _first(code, self._start(action.slot))
            elif isinstance(action, Terminate):
                self._signal(action.slot, signal.SIGTERM)
            elif isinstance(action, Kill):
                self._signal(action.slot, signal.SIGKILL)
            elif isinstance(action, Restarting):
                log.warning(
                    "restarting process %d in %.1f s (crash %d in a row; %d restarts so far)",
                    action.slot,
                    action.delay,
                    action.crashes,
                    self.core.counts.restarted,
                    extra={"slot": action.slot, "delay": action.delay, "crashes": action.crashes},
                )
            elif isinstance(action, Exit):
                code = action.code
        return code

    def _start(self, slot: int) -> int | None:
        task = {**self.task, "slot": slot, "lifeline": self._lifeline_read}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pigeon.cli.app_process", self.task["app"], str(slot)],
                env={**self.env, TASK_ENV: json.dumps(task)},
                pass_fds=(self._lifeline_read,),
                process_group=0,  # see the module docstring
            )
        except OSError as exc:
            log.error("process %d could not start: %s", slot, exc)
            return self._do(self.core.exited(slot, 1, time.monotonic()))
        self._procs[slot] = proc
        fields = {"slot": slot, "pid": proc.pid}
        log.info("process %d (pid %d) started", slot, proc.pid, extra=fields)
        return None

    def _signal(self, slot: int, sig: signal.Signals) -> None:
        proc = self._procs.get(slot)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)


def _first(code: int | None, other: int | None) -> int | None:
    return other if code is None else code


def watch_files(directory: str, supervisor: Supervisor) -> threading.Thread:
    """Ask ``supervisor`` for a reload whenever a ``.py`` file under
    ``directory`` changes (a daemon thread, with ``watchfiles``).

    Raises:
        ImportError: ``watchfiles`` is not installed.
    """
    import watchfiles

    def watch() -> None:
        for changes in watchfiles.watch(directory, watch_filter=watchfiles.PythonFilter()):
            log.debug("changed: %s", ", ".join(sorted(path for _, path in changes)))
            supervisor.request(RELOAD)

    thread = threading.Thread(target=watch, name="pigeon-run-reload", daemon=True)
    thread.start()
    return thread
