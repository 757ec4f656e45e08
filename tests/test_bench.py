"""`pigeon bench` runs end to end and reports in the documented shape.

These tests check the harness, never speed: every run is short and no figure
is compared with anything.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from pigeon.bench import main

RESULT_KEYS = {
    "system",
    "variant",
    "msgs_per_s",
    "p50_us",
    "p99_us",
    "peak_rss_mb",
    "note",
    "pigeon_x",
    "vs_plain",
    "floor",
    "vs_floor",
}
SYSTEMS = {"pigeon", "pyzmq", "nats", "rabbitmq", "redis", "disk"}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    """Run the command and return the JSON object on the last stdout line."""
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    report = f"exit code {code}\n--- stderr ---\n{captured.err}\n--- stdout ---\n{captured.out}"
    assert code == 0, report
    out = captured.out.strip().splitlines()
    assert out, report
    doc = json.loads(out[-1])
    assert set(doc) == {"scenario", "results", "skipped"}
    assert doc["scenario"] == argv[0]
    for row in doc["results"]:
        assert RESULT_KEYS <= set(row), row
        assert row["system"] in SYSTEMS
    for skip in doc["skipped"]:
        assert skip["system"] in SYSTEMS and skip["reason"]
    # pigeon either ran or says why not; it is never silently missing.
    assert any(r["system"] == "pigeon" for r in doc["results"] + doc["skipped"])
    return doc


def pyzmq_rows(doc: dict) -> list[dict]:
    return [r for r in doc["results"] if r["system"] == "pyzmq"]


@pytest.mark.timeout(240)
def test_queue_reports_pyzmq_rows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.bench import runner

    entries = only("queue", ("pigeon", "{size}"), ("pyzmq", "{size}"))
    monkeypatch.setitem(runner.REGISTRY, "queue", entries)
    doc = run_json(capsys, "queue", "--seconds", "1", "--peers", "pyzmq", "--no-curve")
    rows = pyzmq_rows(doc)
    assert [r["variant"] for r in rows] == ["16B", "1KiB"], doc
    assert all(r["msgs_per_s"] > 0 and r["p50_us"] is None for r in rows)


@pytest.mark.timeout(240)
def test_rpc_reports_latency_and_throughput(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.bench import report, runner

    depths = ("1 in flight", "10 in flight", "100 in flight")
    wanted = [(system, depth) for system in ("pigeon", "pyzmq") for depth in depths]
    monkeypatch.setitem(runner.REGISTRY, "rpc", only("rpc", *wanted))
    doc = run_json(capsys, "rpc", "--seconds", "1", "--peers", "pyzmq", "--no-curve")
    rows = {(r["system"], r["variant"]): r for r in doc["results"]}
    assert set(rows) == set(wanted), doc
    for row in rows.values():  # latency and throughput at every depth
        assert 0 < row["p50_us"] <= row["p99_us"] and row["msgs_per_s"] > 0
    for depth in depths:  # raw pyzmq's row of each depth is set against pigeon's
        mine, raw = rows["pigeon", depth], rows["pyzmq", depth]
        assert raw["pigeon_x"] == pytest.approx(report.ratio(raw, mine)) and raw["pigeon_x"] > 0


@pytest.mark.timeout(240)
def test_backlog_reports_peak_rss(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "backlog", "--count", "20000", "--peers", "pyzmq")
    rows = pyzmq_rows(doc)
    assert len(rows) == 1, doc
    (row,) = rows
    assert row["peak_rss_mb"] > 0 and row["msgs_per_s"] > 0


@pytest.mark.timeout(240)
def test_unreachable_servers_are_skipped_with_the_reason(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.bench import runner

    peers = ("nats", "rabbitmq", "redis")
    theirs = [e for e in runner.REGISTRY["queue"] if e.system in peers]
    assert {e.system for e in theirs} == set(peers)
    monkeypatch.setitem(runner.REGISTRY, "queue", [*only("queue", ("pigeon", "{size}")), *theirs])
    doc = run_json(
        capsys,
        "queue",
        "--seconds",
        "0.5",
        "--size",
        "16",
        "--peers",
        ",".join(peers),
        "--nats-url=nats://127.0.0.1:1",
        "--amqp-url=amqp://guest:guest@127.0.0.1:1/",
        "--redis-url=redis://127.0.0.1:1/0",
        "--no-curve",
    )
    for system in peers:
        assert not [r for r in doc["results"] if r["system"] == system], doc
        (skip,) = [s for s in doc["skipped"] if s["system"] == system]
        assert "not reachable" in skip["reason"] and "127.0.0.1:1" in skip["reason"], skip


@pytest.mark.timeout(120)
def test_table_is_printed_and_chart_written(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from pigeon.bench import runner

    rows = only("rpc", ("pigeon", "1 in flight"), ("pyzmq", "1 in flight"))
    monkeypatch.setitem(runner.REGISTRY, "rpc", rows)
    chart = tmp_path / "rpc.png"
    argv = ["rpc", "--seconds", "0.3", "--peers", "pyzmq", "--no-curve", "--chart", str(chart)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "msgs/s" in out and "pyzmq" in out and "vs plain" not in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def row(system: str, variant: str, rate: float) -> dict:
    """A result row as the bench reports it, with only these fields set."""
    return dict.fromkeys(RESULT_KEYS) | {"system": system, "variant": variant, "msgs_per_s": rate}


def test_table_has_a_vs_plain_column_for_curve_rows() -> None:
    from pigeon.bench import report

    doc = {
        "scenario": "queue",
        "results": [
            row("pigeon", "16B", 400.0),
            row("pigeon", "16B curve", 300.0),
            row("pyzmq", "16B curve", 600.0),
        ],
        "skipped": [],
    }
    report.add_ratios(doc, {("pigeon", "16B curve"): "16B", ("pyzmq", "16B curve"): "16B"})
    pigeon_curve, pyzmq_curve = doc["results"][1:]
    assert pigeon_curve["vs_plain"] == 0.75 and pigeon_curve["pigeon_x"] == 1.0
    assert pyzmq_curve["pigeon_x"] == 0.5 and pyzmq_curve["vs_plain"] is None  # no plain row
    lines = report.table(doc).splitlines()
    assert "vs plain" in lines[1]
    assert lines[4].split()[-2:] == ["1.00", "0.75"], lines
    assert lines[5].split()[-2:] == ["0.50", "-"], lines


def test_floor_and_versus_ratios_and_the_vs_floor_column() -> None:
    from pigeon.bench import report

    doc = {
        "scenario": "queue",
        "results": [
            row("pigeon", "node, await send 16B", 2_000.0),
            row("pigeon", "node, send_many 16B", 100_000.0),
            row("pyzmq", "REQ/REP round trips 16B", 20_000.0),
            row("redis", "XADD one at a time 16B", 4_000.0),
        ],
        "skipped": [],
    }
    report.add_ratios(
        doc,
        {},
        versus_of={("redis", "XADD one at a time 16B"): "node, await send 16B"},
        floor_of={
            ("pigeon", "node, await send 16B"): ("pyzmq", "REQ/REP round trips 16B"),
            ("pigeon", "node, send_many 16B"): ("pyzmq", "16B"),  # not in this run
        },
    )
    await_send, send_many, round_trips, redis = doc["results"]
    assert await_send["floor"] == "pyzmq REQ/REP round trips 16B"
    assert await_send["vs_floor"] == 0.1
    assert send_many["floor"] == "pyzmq 16B" and send_many["vs_floor"] is None
    assert round_trips["floor"] is None and round_trips["pigeon_x"] is None
    assert redis["pigeon_x"] == 0.5 and redis["vs_floor"] is None
    lines = report.table(doc).splitlines()
    assert "vs floor" in lines[1]
    assert "0.10 of pyzmq REQ/REP round trips 16B" in lines[3], lines
    assert "0.50" in lines[6], lines


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


def only(scenario: str, *wanted: tuple[str, str]) -> list:
    """The registry entries of ``scenario`` for these (system, variant template)."""
    from pigeon.bench import runner

    entries = [e for e in runner.REGISTRY[scenario] if (e.system, e.variant) in wanted]
    assert len(entries) == len(wanted)
    return entries


def check_curve_rows(doc: dict, plain: str, curve: str) -> None:
    rows = {(r["system"], r["variant"]): r for r in doc["results"]}
    assert {("pigeon", plain), ("pigeon", curve), ("pyzmq", curve)} <= set(rows), doc
    mine, raw = rows["pigeon", curve], rows["pyzmq", curve]
    assert mine["msgs_per_s"] > 0 and raw["msgs_per_s"] > 0
    # pigeon with CURVE against pigeon without, and against raw pyzmq with CURVE.
    assert mine["vs_plain"] == pytest.approx(
        mine["msgs_per_s"] / rows["pigeon", plain]["msgs_per_s"]
    )
    assert raw["pigeon_x"] == pytest.approx(mine["msgs_per_s"] / raw["msgs_per_s"])
    assert rows["pigeon", plain]["vs_plain"] is None


@pytest.mark.timeout(120)
def test_curve_queue_rows_report_both_ratios(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.bench import runner

    entries = only(
        "queue", ("pigeon", "{size}"), ("pigeon", "{size} curve"), ("pyzmq", "{size} curve")
    )
    monkeypatch.setitem(runner.REGISTRY, "queue", entries)
    doc = run_json(capsys, "queue", "--seconds", "0.5", "--size", "16", "--peers", "pyzmq")
    assert not doc["skipped"], doc
    check_curve_rows(doc, "16B", "16B curve")


@pytest.mark.timeout(120)
def test_curve_rpc_rows_report_both_ratios(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pigeon.bench import runner

    entries = only(
        "rpc",
        ("pigeon", "100 in flight"),
        ("pigeon", "curve, 100 in flight"),
        ("pyzmq", "curve, 100 in flight"),
        ("pyzmq", "curve, 1 in flight"),
    )
    monkeypatch.setitem(runner.REGISTRY, "rpc", entries)
    doc = run_json(capsys, "rpc", "--seconds", "0.3", "--peers", "pyzmq")
    assert not doc["skipped"], doc
    check_curve_rows(doc, "100 in flight", "curve, 100 in flight")
    (latency,) = [r for r in doc["results"] if r["variant"] == "curve, 1 in flight"]
    assert 0 < latency["p50_us"] <= latency["p99_us"]


def test_no_curve_leaves_the_curve_rows_out() -> None:
    from pigeon.bench import runner

    opts = runner.parse_args(["rpc", "--peers", "pyzmq", "--no-curve"])
    rows = runner._rows("rpc", ["pigeon", "pyzmq"], opts)
    assert rows and all(r.curve_of is None and "curve" not in r.kwargs for r in rows)
    opts = runner.parse_args(["queue", "--peers", "pyzmq", "--size", "16"])
    variants = [(r.system, r.variant) for r in runner._rows("queue", ["pigeon", "pyzmq"], opts)]
    assert variants == [
        ("pigeon", "16B"),
        ("pyzmq", "16B"),
        ("pigeon", "16B curve"),
        ("pyzmq", "16B curve"),
        ("pigeon", "node, await send 16B"),
        ("pigeon", "node, send_nowait 16B"),
        ("pigeon", "node, send_many 16B"),
        ("pyzmq", "REQ/REP round trips 16B"),
    ]


@pytest.mark.timeout(120)
def test_a_taken_port_fails_fast_with_the_childs_stderr_then_is_retried(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw backlog must pick its port before binding it. A child whose
    bind is refused ends the attempt at once, quoting its stderr; the run is
    tried again with another port, and gives up after three."""
    from pigeon.bench import harness, peers_zmq

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port])
        monkeypatch.setattr(
            peers_zmq, "free_port", lambda: next(picks, None) or harness.free_port()
        )
        doc = run_json(capsys, "backlog", "--count", "20000", "--peers", "pyzmq")
        assert [r["system"] for r in doc["results"]] == ["pigeon", "pyzmq"], doc

        monkeypatch.setattr(peers_zmq, "free_port", lambda: port)
        t = time.monotonic()
        doc = run_json(capsys, "backlog", "--count", "20000", "--peers", "pyzmq")
        elapsed = time.monotonic() - t
    (skip,) = [s for s in doc["skipped"] if s["system"] == "pyzmq"]
    assert harness.port_clash(skip["reason"]), skip
    assert "Traceback" in skip["reason"] or "ZMQError" in skip["reason"], skip
    assert elapsed < 60, elapsed


@pytest.mark.timeout(120)
def test_hostile_rows_report_what_was_kept() -> None:
    import asyncio

    from pigeon.bench import hostile

    row = asyncio.run(hostile._row("batch bomb", 1.0))
    assert row["node_alive"] and row["note"] == "", row
    assert row["kept_pct"] > 0 and row["peak_rss_mb"] > 0
    doc = {"results": [row]}
    assert "batch bomb" in hostile.table(doc)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "scenario,await_send_floor",
    [("queue", "pyzmq REQ/REP round trips 16B"), ("queue-durable", "disk fsync per write")],
)
def test_node_rows_report_a_rate_against_their_floors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    scenario: str,
    await_send_floor: str,
) -> None:
    """A standalone `pigeon node`, a producer in each style and three
    workers; each row against the raw floor of its style, run beside it."""
    from pigeon.bench import runner

    floors = {runner.PUSH_PULL, runner.ROUND_TRIPS, runner.FSYNC}
    entries = [
        e
        for e in runner.REGISTRY[scenario]
        if e.variant.startswith("node") or (e.system, e.variant) in floors
    ]
    monkeypatch.setitem(runner.REGISTRY, scenario, entries)
    argv = [scenario, "--seconds", "1", "--size", "16", "--peers", "pyzmq,disk"]
    doc = run_json(capsys, *argv)
    assert not doc["skipped"], doc
    rows = {r["variant"]: r for r in doc["results"]}
    by_name = {f"{r['system']} {r['variant']}": r for r in doc["results"]}
    expected = {
        "node, await send 16B": await_send_floor,
        "node, send_nowait 16B": "pyzmq 16B",
        "node, send_many 16B": "pyzmq 16B",
    }
    for variant, floor in expected.items():
        row = rows[variant]
        assert row["system"] == "pigeon" and row["msgs_per_s"] > 0, row
        assert row["peak_rss_mb"] > 0, row  # the node's
        assert row["floor"] == floor, row
        assert row["vs_floor"] == pytest.approx(row["msgs_per_s"] / by_name[floor]["msgs_per_s"])


@pytest.mark.timeout(240)
def test_redis_rows_run_or_skip_with_a_reason(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis Streams beside the durable node's awaited send. Where no Redis
    server answers, the rows are skipped with the reason (and this test
    fails when CI is set: CI must have Redis); a reachable Redis must run."""
    from pigeon.bench import runner

    entries = only(
        "queue-durable",
        ("pigeon", runner.AWAIT_SEND),
        ("redis", "XADD one at a time {size}"),
        ("redis", "XADD pipelined 1000 {size}"),
    )
    monkeypatch.setitem(runner.REGISTRY, "queue-durable", entries)
    argv = ["queue-durable", "--seconds", "1", "--size", "16", "--peers", "redis"]
    doc = run_json(capsys, *argv)
    down = [s for s in doc["skipped"] if s["system"] == "redis" and s["variant"] is None]
    if down:
        reason = f"redis rows skipped: {down[0]['reason']}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: Redis must be there)")
        pytest.skip(reason)
    assert not doc["skipped"], doc
    rows = {r["variant"]: r for r in doc["results"] if r["system"] == "redis"}
    assert set(rows) == {"XADD one at a time 16B", "XADD pipelined 1000 16B"}, doc
    for row in rows.values():
        assert row["msgs_per_s"] > 0 and "appendonly" in row["note"], row
    (node,) = [r for r in doc["results"] if r["system"] == "pigeon"]
    one = rows["XADD one at a time 16B"]
    assert one["pigeon_x"] == pytest.approx(node["msgs_per_s"] / one["msgs_per_s"])


@pytest.mark.timeout(300)
def test_fanout_reports_every_row_and_counts_every_gap(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One publisher to 1 and 4 subscribers, tiny: pigeon through a hub node
    and with the publisher binding, each publish style; raw PUB/SUB; nats-py
    (or its reason for skipping). Every message not received is accounted
    for: by pigeon's topic host as dropped, and as missed by the subscriber
    when a later message showed it the gap (``uncounted`` is the rest)."""
    from pigeon.bench import runner

    doc = run_json(capsys, "fanout", "--seconds", "0.2", "--peers", "pyzmq,nats")
    nats_down = [s for s in doc["skipped"] if s["system"] == "nats" and s["variant"] is None]
    assert [s for s in doc["skipped"] if s not in nats_down] == [], doc
    expected = {
        (e.system, e.variant)
        for e in runner.REGISTRY["fanout"]
        if not (nats_down and e.system == "nats")
    }
    rows = {(r["system"], r["variant"]): r for r in doc["results"]}
    assert set(rows) == expected, doc
    peers: dict[tuple[str, int], dict] = {}
    for (system, variant), row in rows.items():
        n = row["subscribers"]
        assert n in (1, 4) and variant.endswith("1 subscriber" if n == 1 else "4 subscribers")
        assert set(runner.FANOUT_FIELDS) <= set(row), row
        assert row["msgs_per_s"] > 0 and row["sent"] > 0 and row["size"] == 100, row
        assert 0 <= row["lost"] == row["sent"] * n - row["received"], row
        if system == "pigeon":
            assert row["missed"] + row["uncounted"] == row["lost"] == row["dropped"], row
            assert 0 <= row["gaps"] <= row["missed"], row
            if variant.startswith("hub node"):
                # Through the hub the first publish reaches every subscriber
                # before anything is dropped: each loss is seen as a gap.
                assert row["uncounted"] == 0, row
        else:
            assert row["gaps"] is row["missed"] is row["dropped"] is row["uncounted"] is None
            peers[system, n] = row
    for row in rows.values():
        for peer in ("pyzmq", "nats"):
            base = peers.get((peer, row["subscribers"]))
            if row["system"] != "pigeon" or base is None:
                assert row[f"vs_{peer}"] is None, row
            else:
                assert row[f"vs_{peer}"] == pytest.approx(row["msgs_per_s"] / base["msgs_per_s"])
    if nats_down:
        assert "not reachable" in nats_down[0]["reason"]
