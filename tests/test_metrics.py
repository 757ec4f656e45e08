"""Prometheus metrics: the middleware's counts, bounded labels, the queue
gauges of a hosting node, one endpoint for several processes, and
``pigeon node --metrics-port`` scraped over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from brokers import describe
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import pigeon
import pigeon.sync
from pigeon.metrics import OTHER, PrometheusMetrics, serve_metrics
from pigeon.testing.conformance import wait_until

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
WAIT = 30.0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("url", ["memory://metrics", "bind"])
def test_the_middleware_counts_sends_handles_retries_dead_letters_and_requests(url: str) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    transport = "memory" if url.startswith("memory") else "tcp"

    async def main() -> None:
        handled: list[str] = []
        options = {"bind": "tcp://127.0.0.1:0"} if url == "bind" else {}
        conn = pigeon.connect(None if url == "bind" else url, middleware=[metrics], **options)
        async with conn:

            async def work(delivery: pigeon.Delivery) -> None:
                handled.append(delivery.message.text)
                if delivery.message.text == "bad":
                    raise ValueError("bad")

            retry = pigeon.RetryPolicy(max_attempts=2, base_delay=0.01, jitter=0.0)
            for n in range(3):
                await conn.send("m-jobs", f"held {n}")  # waits: no worker yet
            with serve_metrics(0, registry=registry) as endpoint:
                samples = scrape(endpoint.url)
                assert (
                    value(samples, "pigeon_queue_ready", transport=transport, queue="m-jobs") == 3
                )
                assert (
                    value(samples, "pigeon_queue_consumers", transport=transport, queue="m-jobs")
                    == 0
                )
                await conn.consume("m-jobs", work, retry=retry)
                await conn.send("m-jobs", "bad")
                await conn.serve("m-svc", lambda message: "ok")
                await conn.request("m-svc", "x", timeout=WAIT)
                with pytest.raises(pigeon.NoResponders):
                    await conn.request("m-nobody", "x", timeout=5.0)
                await conn.subscribe("m.*", lambda event: handled.append(event.topic))
                await conn.publish("m.news", "hello")
                await wait_until(lambda: len(handled) == 6, WAIT, "six handled")

                def settled() -> bool:
                    now = scrape(endpoint.url)
                    return (
                        value(
                            now,
                            "pigeon_messages_handled_total",
                            transport=transport,
                            queue="m-jobs",
                            outcome="dead_lettered",
                        )
                        == 1
                    )

                await wait_until(settled, WAIT, "the dead letter counted")
                samples = scrape(endpoint.url)

        t = {"transport": transport}
        assert value(samples, "pigeon_messages_sent_total", queue="m-jobs", **t) == 4
        assert (
            value(samples, "pigeon_messages_handled_total", queue="m-jobs", outcome="acked", **t)
            == 3
        )
        assert (
            value(samples, "pigeon_messages_handled_total", queue="m-jobs", outcome="retried", **t)
            == 1
        )
        assert value(samples, "pigeon_retries_total", queue="m-jobs", **t) == 1
        assert value(samples, "pigeon_dead_letters_total", queue="m-jobs", **t) == 1
        assert value(samples, "pigeon_handler_seconds_count", queue="m-jobs", **t) == 5
        assert value(samples, "pigeon_requests_total", service="m-svc", outcome="ok", **t) == 1
        assert (
            value(
                samples, "pigeon_requests_total", service="m-nobody", outcome="no_responders", **t
            )
            == 1
        )
        assert value(samples, "pigeon_request_seconds_count", service="m-svc", **t) == 1
        assert (
            value(samples, "pigeon_requests_served_total", service="m-svc", outcome="ok", **t) == 1
        )
        assert value(samples, "pigeon_published_total", topic="m.news", **t) == 1
        # A subscriber's deliveries are counted under their topic.
        handled_event = value(
            samples, "pigeon_messages_handled_total", queue="m.news", outcome="acked", **t
        )
        assert handled_event == 1
        assert value(samples, "pigeon_queue_ready", queue="m-jobs", **t) == 0

    asyncio.run(main())


def test_label_values_are_bounded_and_the_rest_counted_under_other() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry, max_names=2)
    with pigeon.sync.connect("memory://metrics-cap", middleware=[metrics]) as conn:
        for n in range(5):
            conn.send(f"cap-{n}", "x")
    assert (
        registry.get_sample_value(
            "pigeon_messages_sent_total", {"transport": "memory", "queue": OTHER}
        )
        == 3
    )
    assert metrics.overflowed == 3
    queues = {
        sample.labels["queue"]
        for family in registry.collect()
        if family.name == "pigeon_messages_sent"
        for sample in family.samples
    }
    assert queues == {"cap-0", "cap-1", OTHER}


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="max_names"):
        PrometheusMetrics(registry=CollectorRegistry(), max_names=0)
    with pytest.raises(ValueError, match="port"):
        serve_metrics(70000)


def test_without_prometheus_client_the_import_says_what_to_install() -> None:
    code = "import sys; sys.modules['prometheus_client'] = None; import pigeon.metrics"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode != 0
    assert (
        "pigeon.metrics needs prometheus_client: pip install 'pigeon-queues[metrics]'"
        in done.stderr
    )


SENDER = textwrap.dedent(
    """
    import sys
    import pigeon.sync
    from pigeon.metrics import PrometheusMetrics

    count = int(sys.argv[1])
    with pigeon.sync.connect("memory://multi", middleware=[PrometheusMetrics()]) as conn:
        for n in range(count):
            conn.send("multi-jobs", n)
    """
)


def test_several_processes_are_served_as_one(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    senders = [
        subprocess.Popen([sys.executable, "-c", SENDER, str(count)], env=env) for count in (7, 11)
    ]
    for sender in senders:
        assert sender.wait(WAIT) == 0
    with serve_metrics(0, multiprocess_dir=directory) as endpoint:
        samples = scrape(endpoint.url)
    assert (
        value(samples, "pigeon_messages_sent_total", transport="memory", queue="multi-jobs") == 18
    )


class NodeProcess:
    """``pigeon node --metrics-port 0``, and where it serves what."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*PIGEON, "node", "--bind", "tcp://127.0.0.1:0", "--metrics-port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = [self._line(), self._line()]
        served = re.search(r"serving (tcp://\S+?);", self.lines[0])
        metrics = re.search(r"metrics on (http://\S+)", self.lines[1])
        assert served and metrics, self.lines
        self.url, self.metrics = served.group(1), metrics.group(1)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(WAIT):
                self.proc.kill()
                raise AssertionError(f"no banner within {WAIT} s")
        return self.proc.stdout.readline()

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=WAIT)
        assert self.proc.returncode == 0, describe("pigeon node", self.proc.returncode, None, err)
        return err


@pytest.mark.timeout(120)
def test_pigeon_node_serves_its_queues_over_http() -> None:
    node = NodeProcess("--log-level", "DEBUG", "--log-format", "json")
    try:
        with pigeon.sync.connect(node.url) as conn:
            for n in range(5):
                conn.send("node-jobs", n)
            samples = scrape(node.metrics)
            assert value(samples, "pigeon_queue_ready", transport="tcp", queue="node-jobs") == 5
            got: list[int] = []
            worker = conn.consume("node-jobs", lambda d: got.append(d.decode()), prefetch=1)
            deadline = time.monotonic() + WAIT
            while len(got) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sorted(got) == list(range(5))

            def drained() -> bool:
                now = scrape(node.metrics)
                return (
                    value(now, "pigeon_queue_ready", transport="tcp", queue="node-jobs") == 0
                    and value(now, "pigeon_queue_consumers", transport="tcp", queue="node-jobs")
                    == 1
                )

            deadline = time.monotonic() + WAIT
            while not drained():
                assert time.monotonic() < deadline, scrape(node.metrics)
                time.sleep(0.05)
            worker.close()
    finally:
        err = node.stop()
    import json

    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert events and all({"ts", "level", "logger", "message"} <= set(e) for e in events)
    messages = [e["message"] for e in events]
    assert any(m.startswith("connected") for m in messages)
    assert any(m.startswith("closed") for m in messages)
