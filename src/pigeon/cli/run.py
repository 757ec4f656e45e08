"""``pigeon run MODULE[:ATTR]``: run an app's workers, services and
subscribers in ``--workers`` processes under one supervisor, which restarts
a crashed process with backoff, drains them all on SIGTERM or Ctrl-C, and
restarts them when the code changes (``--reload``).

The app is loaded here first, so a mistake in it (no module, no attribute,
not an App, an exception while importing) ends the command at once with one
line naming it (the traceback with ``--log-level DEBUG``), exit 2.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

import click

from .._core import limits
from .._core.supervise import Supervision
from .._extras import install_hint
from ..errors import ConfigurationError
from ..transports.nats.security import redact
from .app_process import setup_logging, spec
from .load import AppNotLoaded, load_app, parse_reference, source_directory
from .options import connect_options, key_options, log_options, url_option
from .supervisor import Supervisor, watch_files

log = logging.getLogger("pigeon.run")

DEFAULT_GRACE = 30.0
MAX_WORKERS = 256  # processes on one machine: more is a typo
MAX_CONCURRENCY = 10_000


@click.command(name="run")
@click.argument("app_reference", metavar="MODULE[:ATTR]")
@click.option(
    "--workers",
    envvar="PIGEON_WORKERS",
    type=click.IntRange(1, MAX_WORKERS),
    default=1,
    show_default=True,
    help="app processes to run (or PIGEON_WORKERS)",
)
@click.option(
    "--concurrency",
    envvar="PIGEON_CONCURRENCY",
    type=click.IntRange(1, MAX_CONCURRENCY),
    default=None,
    help="handlers each worker and subscriber runs at once in each process, for those "
    "that set no concurrency= of their own (default 1; or PIGEON_CONCURRENCY)",
)
@click.option(
    "--grace",
    envvar="PIGEON_GRACE",
    type=click.FloatRange(0, limits.MAX_SECONDS),
    default=DEFAULT_GRACE,
    show_default=True,
    metavar="SECONDS",
    help="on SIGTERM or Ctrl-C, how long running handlers may finish (or PIGEON_GRACE)",
)
@click.option(
    "--reload",
    is_flag=True,
    help="restart the processes when a .py file under the app's directory changes "
    "(development; needs the reload extra)",
)
@click.option(
    "--metrics-port",
    envvar="PIGEON_METRICS_PORT",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="serve the Prometheus metrics of every process at /metrics on PORT (0: any free "
    "port; needs the metrics extra; or PIGEON_METRICS_PORT)",
)
@click.option(
    "--metrics-host",
    envvar="PIGEON_METRICS_HOST",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="the address the metrics endpoint listens on (or PIGEON_METRICS_HOST)",
)
@url_option
@key_options
@log_options
def run(
    app_reference: str,
    workers: int,
    concurrency: int | None,
    grace: float,
    reload: bool,
    metrics_port: int | None,
    metrics_host: str,
    url: str | None,
    key: str | None,
    server_key: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run an app: its workers, services and subscribers, in N processes."""
    setup_logging(log_level, log_format)
    cwd = os.getcwd()
    try:
        reference = parse_reference(app_reference, cwd)
        app = load_app(reference)
        app.configure(concurrency=concurrency)  # checked here, used by each process
    except AppNotLoaded as exc:
        log.debug("the app cannot be loaded", exc_info=exc.__cause__ or exc)
        raise
    if workers > 1 and app.binds:
        # Each process would bind the same address: the second fails on the
        # port clash and is restarted with backoff, forever.
        raise click.BadParameter(
            f"{workers} processes cannot share the app's bind= {', '.join(app.binds)}: it "
            "serves a node itself, and a second process would clash on that address (or, "
            "on port 0, serve a node of its own that the first knows nothing of). Run it "
            "with --workers 1, or build the app with the URL of a node to connect to "
            "(pigeon node) and run as many processes as you like",
            param_hint="'--workers'",
        )
    if reload:
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            hint = install_hint("reload")
            raise ConfigurationError(f"--reload needs watchfiles: {hint}") from None
    endpoint = None if metrics_port is None else _MetricsEndpoint(metrics_port, metrics_host)
    task = spec(
        app=app_reference,
        cwd=cwd,
        url=url,
        options=connect_options(key, server_key),
        concurrency=concurrency,
        grace=grace,
        log_level=log_level,
        log_format=log_format,
        metrics=metrics_port is not None,
    )
    supervisor = Supervisor(
        task,
        Supervision(workers, grace, reload_enabled=reload),
        env=dict(os.environ),  # with PROMETHEUS_MULTIPROC_DIR for --metrics-port
        on_exit=None if endpoint is None else endpoint.process_exited,
    )
    where = f" on {redact(url)}" if url else ""
    processes = "1 process" if workers == 1 else f"{workers} processes"
    log.info("running %s in %s%s", app_reference, processes, where)
    if endpoint is not None:
        log.info("metrics of every process on %s", endpoint.url)
    if reload:
        watched = source_directory(reference)
        watch_files(watched, supervisor)
        log.info("reloading when a .py file under %s changes", watched)
    try:
        code = supervisor.run()
    finally:
        if endpoint is not None:
            endpoint.close()
    counts = supervisor.core.stats()
    log.info(
        "stopped (exit code %d): %d started, %d crashed, %d restarted, %d killed, %d reloads",
        code,
        counts["started"],
        counts["crashed"],
        counts["restarted"],
        counts["killed"],
        counts["reloads"],
    )
    sys.exit(code)


class _MetricsEndpoint:
    """One Prometheus endpoint for every app process: each writes its
    metrics to a directory of its own run (``PROMETHEUS_MULTIPROC_DIR``, set
    here before any process starts), and the endpoint serves their sum."""

    def __init__(self, port: int, host: str) -> None:
        try:
            from .. import metrics
        except ImportError as exc:
            raise ConfigurationError(f"--metrics-port: {exc}") from None
        self._metrics = metrics
        self.directory = tempfile.mkdtemp(prefix="pigeon-run-metrics-")
        metrics.prepare_multiprocess(self.directory)
        try:
            self._server = metrics.serve_metrics(port, host, multiprocess_dir=self.directory)
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise ConfigurationError(
                f"--metrics-port {port}: cannot listen on {host}: {exc.strerror or exc}"
            ) from None
        self.url = self._server.url

    def process_exited(self, pid: int) -> None:
        """Its live gauges stop counting; its counters still do."""
        self._metrics.process_exited(pid, self.directory)

    def close(self) -> None:
        self._server.close()
        shutil.rmtree(self.directory, ignore_errors=True)
