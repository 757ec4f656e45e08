"""`pigeon bench` runs end to end and reports in the documented shape.

These tests check the harness, never speed: every run is short and no figure
is compared with anything.
"""

from __future__ import annotations

import json

import pytest
from brokers import port_taken

from pigeon.bench import main

RESULT_KEYS = {"system", "variant", "msgs_per_s", "p50_us", "p99_us", "peak_rss_mb"}
SYSTEMS = {"pigeon", "pyzmq", "nats", "rabbitmq"}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    """Run the command and return the JSON object on the last stdout line.

    The benchmark picks its ports before binding them: a variant skipped
    because someone else took one meanwhile is run again.
    """
    for attempt in range(3):
        code = main([*argv, "--json"])
        captured = capsys.readouterr()
        report = f"exit code {code}\n--- stderr ---\n{captured.err}\n--- stdout ---\n{captured.out}"
        assert code == 0, report
        out = captured.out.strip().splitlines()
        assert out, report
        doc = json.loads(out[-1])
        if attempt == 2 or not any(port_taken(s["reason"]) for s in doc["skipped"]):
            break
    assert set(doc) == {"scenario", "results", "skipped"}
    assert doc["scenario"] == argv[0]
    for row in doc["results"]:
        assert RESULT_KEYS <= set(row)
        assert row["system"] in SYSTEMS
    for skip in doc["skipped"]:
        assert skip["system"] in SYSTEMS and skip["reason"]
    # pigeon either ran or says why not; it is never silently missing.
    assert any(r["system"] == "pigeon" for r in doc["results"] + doc["skipped"])
    return doc


def pyzmq_rows(doc: dict) -> list[dict]:
    return [r for r in doc["results"] if r["system"] == "pyzmq"]


@pytest.mark.timeout(240)
def test_queue_reports_pyzmq_rows(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "queue", "--seconds", "1", "--peers", "pyzmq")
    rows = pyzmq_rows(doc)
    assert [r["variant"] for r in rows] == ["16B", "1KiB"], doc
    assert all(r["msgs_per_s"] > 0 and r["p50_us"] is None for r in rows)


@pytest.mark.timeout(240)
def test_rpc_reports_latency_and_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "rpc", "--seconds", "1", "--peers", "pyzmq")
    rows = {r["variant"]: r for r in pyzmq_rows(doc)}
    assert set(rows) == {"1 in flight", "100 in flight"}, doc
    one = rows["1 in flight"]
    assert 0 < one["p50_us"] <= one["p99_us"]
    assert rows["100 in flight"]["msgs_per_s"] > 0


@pytest.mark.timeout(240)
def test_backlog_reports_peak_rss(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "backlog", "--count", "20000", "--peers", "pyzmq")
    rows = pyzmq_rows(doc)
    assert len(rows) == 1, doc
    (row,) = rows
    assert row["peak_rss_mb"] > 0 and row["msgs_per_s"] > 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "system,option",
    [
        ("nats", "--nats-url=nats://127.0.0.1:1"),
        ("rabbitmq", "--amqp-url=amqp://guest:guest@127.0.0.1:1/"),
    ],
)
def test_unreachable_server_is_skipped(
    capsys: pytest.CaptureFixture[str], system: str, option: str
) -> None:
    doc = run_json(capsys, "rpc", "--seconds", "1", "--peers", system, option)
    assert not [r for r in doc["results"] if r["system"] == system]
    (skip,) = [s for s in doc["skipped"] if s["system"] == system]
    assert "not reachable" in skip["reason"] and "127.0.0.1:1" in skip["reason"]


@pytest.mark.timeout(120)
def test_table_is_printed_and_chart_written(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    chart = tmp_path / "rpc.png"
    assert main(["rpc", "--seconds", "0.3", "--peers", "pyzmq", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "msgs/s" in out and "pyzmq" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_peer_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["queue", "--peers", "kafka"]) == 2
    assert "unknown peer" in capsys.readouterr().err


def broken_variant(opts: object) -> dict:
    """A variant that crashes, standing in for a peer that breaks mid-run."""
    raise RuntimeError("peer exploded")


def test_a_failing_variant_is_skipped_not_zero(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.bench import runner

    entries = [
        runner.Entry(system, "broken", f"{__name__}:broken_variant")
        for system in ("pigeon", "pyzmq")
    ]
    monkeypatch.setitem(runner.REGISTRY, "rpc", entries)
    doc = run_json(capsys, "rpc", "--peers", "pyzmq")
    assert doc["results"] == []
    (skip,) = [s for s in doc["skipped"] if s["system"] == "pyzmq"]
    assert skip["variant"] == "broken" and "peer exploded" in skip["reason"]
