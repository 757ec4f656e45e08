"""One app process of ``pigeon run``: load the app, run it until SIGTERM or
SIGINT (or until the supervisor is gone), then drain and exit 0.

The supervisor starts it as ``python -m pigeon.cli.app_process APP SLOT``
(for ``ps``) with what to do as a JSON object (:func:`spec`) in the
environment variable ``PIGEON_RUN_TASK``: not in the arguments, which
every user of the machine may read, since the URL may hold a password.
Exit codes: 0 drained and stopped;
``EXIT_CANNOT_LOAD`` (78) the app cannot be loaded or configured, so a
restart would fail the same way; anything else is a crash, restarted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from .. import logs
from .._core.supervise import EXIT_CANNOT_LOAD
from ..app import App
from ..errors import ConfigurationError, PigeonError
from .exits import EXIT_USAGE
from .load import load_app, parse_reference

log = logging.getLogger("pigeon.run")

TASK_ENV = "PIGEON_RUN_TASK"


def spec(
    *,
    app: str,
    cwd: str,
    url: str | None,
    options: dict[str, Any],
    concurrency: int | None,
    grace: float,
    log_level: str,
    log_format: str,
    metrics: bool,
) -> dict[str, Any]:
    """What an app process is told (the ``slot`` is added per process)."""
    return {
        "app": app,
        "cwd": cwd,
        "url": url,
        "options": options,
        "concurrency": concurrency,
        "grace": grace,
        "log_level": log_level,
        "log_format": log_format,
        "metrics": metrics,
    }


def setup_logging(level: str, log_format: str) -> None:
    """Logs to stderr at ``level``, one line per record, as text or JSON."""
    logs.configure(level=level, fmt=log_format)


def _load(task: dict[str, Any]) -> App:
    reference = parse_reference(task["app"], task["cwd"])
    app = load_app(reference)
    app.configure(url=task["url"], concurrency=task["concurrency"], **task["options"])
    if task["metrics"]:
        from ..metrics import PrometheusMetrics

        # PROMETHEUS_MULTIPROC_DIR is set: what it counts is summed with the
        # other processes' at the supervisor's endpoint.
        app.use(PrometheusMetrics())
    return app


async def _run(app: App, grace: float, lifeline: int | None, slot: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_signal() -> None:
        # Later signals change nothing: the supervisor kills at its deadline.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: None)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first_signal)

    if lifeline is not None:
        # The read end of a pipe whose write end only the supervisor holds:
        # it reads as closed once the supervisor is gone, however it went,
        # and an orphan drains instead of running on unsupervised.
        def supervisor_gone() -> None:
            loop.remove_reader(lifeline)
            log.warning("the supervisor is gone: draining")
            stop.set()

        loop.add_reader(lifeline, supervisor_gone)
    try:
        await app.start()
        log.info(
            "process %d (pid %d) ready", slot, os.getpid(), extra={"slot": slot, "pid": os.getpid()}
        )
        await stop.wait()
    finally:
        await app.stop(grace)


def main() -> int:
    """Run one app process; returns its exit code (module docstring)."""
    # Taken out, so that neither the app nor what it starts sees it.
    told = os.environ.pop(TASK_ENV, None)
    if told is None:
        sys.stderr.write("pigeon.cli.app_process is started by pigeon run (pigeon run --help)\n")
        return EXIT_USAGE
    task = json.loads(told)
    setup_logging(task["log_level"], task["log_format"])
    slot = task.get("slot", 0)
    lifeline = task.get("lifeline")
    try:
        app = _load(task)
    except ConfigurationError as exc:
        log.debug("the app cannot be loaded", exc_info=exc.__cause__ or exc)
        log.error("process %d: %s", slot, exc)
        return EXIT_CANNOT_LOAD
    log.debug("process %d (pid %d) runs %s", slot, os.getpid(), task["app"])
    try:
        asyncio.run(_run(app, float(task["grace"]), lifeline, slot))
    except ConfigurationError as exc:
        # A bad URL or option: a restart would fail the same way.
        log.error("process %d: %s: %s", slot, type(exc).__name__, exc)
        return EXIT_CANNOT_LOAD
    except PigeonError as exc:
        log.error("process %d stopped: %s: %s", slot, type(exc).__name__, exc)
        return 1
    log.debug("process %d (pid %d) drained and stopped", slot, os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
