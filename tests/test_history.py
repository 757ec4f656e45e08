"""Tests for the fault-test history checker in pigeon.testing.history."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from brokers import completed, describe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from pigeon.errors import ClosedError, DecodeError
from pigeon.testing.history import Event, HistoryWriter, check, load_history, main

# Most of these take milliseconds; the bound is for a machine that is busy.
pytestmark = pytest.mark.timeout(30)


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class Hist:
    """Builds a synthetic history in memory, one event every 10 ns."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.seqs: dict[str, int] = {}

    def add(self, type: str, f: str, **fields: object) -> Event:
        event = Event(
            t=10 * (len(self.events) + 1), wall=0.0, proc="test", type=type, f=f, **fields
        )
        self.events.append(event)
        return event

    def send(self, id: str, *, producer: str = "p1", outcome: str | None = "ok", queue: str = "q"):
        seq = self.seqs[producer] = self.seqs.get(producer, 0) + 1
        self.add(
            "invoke", "send", queue=queue, id=id, producer=producer, seq=seq, sha=sha(id.encode())
        )
        if outcome is not None:
            self.add(outcome, "send", queue=queue, id=id)

    def deliver(self, id: str, *, consumer: str = "c1", redelivered: bool = False, body=None):
        body = id.encode() if body is None else body
        self.add(
            "ok",
            "deliver",
            queue="q",
            id=id,
            redelivered=redelivered,
            attempt=1,
            sha=sha(body),
            consumer=consumer,
        )

    def ack(self, id: str, consumer: str = "c1") -> None:
        self.add("ok", "ack", queue="q", id=id, consumer=consumer)

    def rpc(self, id: str, *, servers=("s1",), reply_to: str | None = None) -> None:
        self.add("invoke", "request", service="svc", id=id)
        for server in servers:
            self.add("ok", "execute", service="svc", id=id, server=server)
        self.add(
            "ok", "request", service="svc", id=id, reply_to=id if reply_to is None else reply_to
        )

    def check(self):
        return check(self.events)


def clean(n: int = 5, *, acks: bool = True) -> Hist:
    h = Hist()
    h.add("info", "nemesis", what="partition", target="c1")
    for i in range(1, n + 1):
        h.send(f"m{i}")
        h.send(f"n{i}", producer="p2")
    for i in range(1, n + 1):
        h.deliver(f"m{i}")
        h.deliver(f"n{i}", consumer="c2")
        if acks:
            h.ack(f"m{i}")
            h.ack(f"n{i}", "c2")
    h.rpc("r1")
    return h


PROBLEMS = (
    "lost",
    "unexpected",
    "false_fail",
    "corrupt",
    "unmarked_duplicates",
    "redelivered_after_ack",
    "order_inversions",
    "rpc_double_execution",
    "rpc_mismatched",
)


def only(result, name: str) -> None:
    """Assert the result is invalid and ``name`` is the only problem reported."""
    assert not result.valid
    summary = result.summary()
    problems = [k for k in PROBLEMS if summary[k]]
    assert problems == [name]


def test_clean_history_is_valid():
    r = clean().check()
    assert r.valid, str(r)
    s = r.summary()
    assert s["attempted"] == s["acknowledged"] == s["delivered"] == s["deliveries"] == 10
    assert s["requests"] == s["executions"] == s["nemesis"] == 1
    assert s["marked_duplicates"] == 0 and s["lost"] == 0
    json.dumps(s)  # must be JSON-serialisable
    assert "valid" in str(r)


def test_removing_one_delivery_makes_it_lost_in_the_middle():
    h = clean()
    h.events = [e for e in h.events if not (e.f in ("deliver", "ack") and e.id == "m3")]
    r = h.check()
    only(r, "lost")
    assert r.lost == {"m3"}
    assert r.lost_breakdown == {"p1": {"prefix": [], "middle": ["m3"], "postfix": []}}
    assert r.summary()["lost_breakdown"] == {"prefix": 0, "middle": 1, "postfix": 0}
    assert "m3" in str(r) and "INVALID" in str(r)


def test_lost_breakdown_prefix_and_postfix():
    h = Hist()
    for i in range(1, 6):
        h.send(f"m{i}")
    h.send("x1", producer="p2")
    h.deliver("m2")
    h.deliver("m4")
    r = h.check()
    assert r.lost == {"m1", "m3", "m5", "x1"}
    assert r.lost_breakdown["p1"] == {"prefix": ["m1"], "middle": ["m3"], "postfix": ["m5"]}
    # A producer with nothing delivered has all its losses in the prefix.
    assert r.lost_breakdown["p2"] == {"prefix": ["x1"], "middle": [], "postfix": []}


def test_delivery_of_an_id_never_sent_is_unexpected():
    h = clean()
    h.deliver("ghost")
    r = h.check()
    only(r, "unexpected")
    assert r.unexpected == {"ghost"}


def test_failed_send_that_is_delivered_is_false_fail():
    h = clean()
    h.send("f1", outcome="fail")
    h.send("f2", outcome="fail")  # failed and never delivered: fine
    h.deliver("f1")
    r = h.check()
    only(r, "false_fail")
    assert r.false_fail == {"f1"}
    assert r.summary()["failed"] == 2


def test_fail_then_successful_retry_is_not_false_fail():
    h = clean()
    h.send("f1", outcome="fail")
    h.add("invoke", "send", queue="q", id="f1", producer="p1", seq=99, sha=sha(b"f1"))
    h.add("ok", "send", queue="q", id="f1")
    h.deliver("f1")
    assert h.check().valid


def test_indeterminate_sends_are_recovered_or_forgiven():
    h = clean()
    h.send("i1", outcome="info")
    h.send("i2", outcome="info")
    h.send("i3", outcome=None)  # writer killed before the outcome
    h.send("i4", outcome="info")
    h.add("fail", "send", queue="q", id="i4")  # a retry failed, but the first try may have landed
    h.deliver("i1")
    h.deliver("i4")
    r = h.check()
    assert r.valid, str(r)
    assert r.recovered == {"i1", "i4"}
    assert r.summary()["indeterminate"] == 4


def test_duplicate_without_flag_is_caught():
    h = clean(acks=False)
    h.deliver("m2", consumer="c3")  # a new consumer, so this is no order inversion either
    r = h.check()
    only(r, "unmarked_duplicates")
    assert r.unmarked_duplicates == {"m2"}


def test_duplicate_with_flag_is_only_counted():
    h = clean(acks=False)
    h.deliver("m2", redelivered=True)
    h.deliver("m2", consumer="c2", redelivered=True)
    r = h.check()
    assert r.valid, str(r)
    assert r.marked_duplicates == 2 and not r.unmarked_duplicates


def test_changed_body_is_corrupt():
    h = clean()
    h.events = [
        replace(e, sha=sha(b"m4 but different")) if e.f == "deliver" and e.id == "m4" else e
        for e in h.events
    ]
    r = h.check()
    only(r, "corrupt")
    assert r.corrupt == {"m4"}


def test_order_inversion_is_caught():
    h = Hist()
    for i in range(1, 4):
        h.send(f"m{i}")
    h.deliver("m1")
    h.deliver("m3")
    h.deliver("m2")
    r = h.check()
    only(r, "order_inversions")
    assert r.order_inversions == {"m2"}


def test_redelivered_out_of_order_is_not_an_inversion():
    h = Hist()
    for i in range(1, 4):
        h.send(f"m{i}")
    h.deliver("m1")
    h.deliver("m2", consumer="c2")  # c2 dies before acking
    h.deliver("m3")
    h.deliver("m2", redelivered=True)
    r = h.check()
    assert r.valid, str(r)
    assert r.marked_duplicates == 1


def test_order_is_per_consumer_and_per_producer():
    h = Hist()
    h.send("a1")
    h.send("a2")
    h.send("b1", producer="p2")
    h.deliver("a2", consumer="c1")
    h.deliver("a1", consumer="c2")  # competing consumers: order only holds per consumer
    h.deliver("b1", consumer="c1")  # another producer's seq 1 after p1's seq 2
    assert h.check().valid


def test_delivery_after_ack_is_caught():
    h = clean()
    h.deliver("m1", redelivered=True)
    r = h.check()
    only(r, "redelivered_after_ack")
    assert r.redelivered_after_ack == {"m1"}


def test_redelivery_before_the_ack_is_fine():
    h = Hist()
    h.send("m1")
    h.deliver("m1")
    h.deliver("m1", redelivered=True)
    h.ack("m1")
    assert h.check().valid


def test_double_execute_is_caught():
    h = clean()
    h.rpc("r2", servers=("s1", "s1"))
    r = h.check()
    only(r, "rpc_double_execution")
    assert r.rpc_double_execution == {"r2"}


def test_execution_on_two_servers_is_informational():
    h = clean()
    h.rpc("r2", servers=("s1", "s2"))
    r = h.check()
    assert r.valid, str(r)
    assert r.rpc_multi_server == {"r2"}
    assert r.summary()["executions"] == 3


def test_mismatched_reply_is_caught():
    h = clean()
    h.rpc("r2", reply_to="r1")
    h.add("invoke", "request", service="svc", id="r3")
    h.add("fail", "request", service="svc", id="r3", error="TimeoutError")
    r = h.check()
    only(r, "rpc_mismatched")
    assert r.rpc_mismatched == {"r2"}


def test_writer_round_trip(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, process="p1") as w:
        w.send_invoke("q", "m1", producer="p1", seq=1, body=b"hello")
        w.send_ok("q", "m1")
        w.send_invoke("q", "m2", producer="p1", seq=2, body=b"bye")
        w.send_fail("q", "m2", ValueError("too big"))
        w.send_invoke("q", "m3", producer="p1", seq=3, body=b"?")
        w.send_info("q", "m3", "timeout")
        w.deliver("q", "m1", redelivered=False, attempt=1, body=b"hello", consumer="c1")
        w.ack_ok("q", "m1", consumer="c1")
        w.request_invoke("svc", "r1")
        w.execute("svc", "r1", server="s1")
        w.request_ok("svc", "r1", reply_to="r1")
        w.request_invoke("svc", "r2")
        w.request_fail("svc", "r2", TimeoutError("no reply"))
        w.nemesis("kill", "c1")
    with pytest.raises(ClosedError):
        w.send_ok("q", "m1")
    w.close()  # closing twice is harmless

    lines = path.read_text().splitlines()
    assert len(lines) == 14
    first = json.loads(lines[0])
    assert first["proc"] == "p1" and first["type"] == "invoke" and first["f"] == "send"
    assert first["sha"] == sha(b"hello") and isinstance(first["t"], int) and "wall" in first

    events = load_history(path)
    assert [e.t for e in events] == sorted(e.t for e in events)
    assert events[3].error == "ValueError: too big"
    assert events[6].f == "deliver" and events[6].consumer == "c1" and events[6].attempt == 1
    assert events[-1].what == "kill" and events[-1].target == "c1"
    r = check(events)
    assert r.valid, str(r)
    assert r.recovered == set() and r.summary()["failed"] == 1


def test_partial_last_line_is_tolerated(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, process="p1") as w:
        for i in range(3):
            w.send_invoke("q", f"m{i}", producer="p1", seq=i, body=b"x")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # cut the last line mid-way
    assert [e.id for e in load_history([path])] == ["m0", "m1"]

    # A writer restarted on the same file drops the fragment instead of gluing onto it.
    with HistoryWriter(path, process="p1") as w:
        w.send_ok("q", "m0")
    assert [e.id for e in load_history(path)] == ["m0", "m1", "m0"]


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, process="p1") as w:
        w.send_ok("q", "m0")
    with open(path, "ab") as f:
        f.write(b'{"t": 1, "proc\n')
    with HistoryWriter(path, process="p1") as w:
        w.send_ok("q", "m1")
    with pytest.raises(DecodeError, match=":2:"):
        load_history(path)


def test_histories_from_several_files_merge_by_time(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with HistoryWriter(a, process="prod") as pw, HistoryWriter(b, process="cons") as cw:
        for i in range(5):
            pw.send_invoke("q", f"m{i}", producer="prod", seq=i, body=b"%d" % i)
            pw.send_ok("q", f"m{i}")
            cw.deliver("q", f"m{i}", redelivered=False, attempt=1, body=b"%d" % i, consumer="c")
            cw.ack_ok("q", f"m{i}", consumer="c")
    events = load_history([b, a])
    assert [e.proc for e in events[:4]] == ["prod", "prod", "cons", "cons"]
    assert [e.t for e in events] == sorted(e.t for e in events)
    assert check(events).valid
    # Loaded in the other file order, the merge is the same.
    assert load_history([a, b]) == events


@pytest.mark.timeout(60)
def test_cli_exit_status(tmp_path, capsys):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    with HistoryWriter(good, process="p") as w:
        w.send_invoke("q", "m1", producer="p", seq=1, body=b"x")
        w.send_ok("q", "m1")
        w.deliver("q", "m1", redelivered=False, attempt=1, body=b"x", consumer="c")
    with HistoryWriter(bad, process="p") as w:
        w.send_invoke("q", "m2", producer="p", seq=2, body=b"y")
        w.send_ok("q", "m2")

    assert main([str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True
    assert main([str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["lost"] == 1
    assert "m2" in captured.err
    assert main([str(tmp_path / "missing.jsonl")]) == 2

    proc = subprocess.run(
        [sys.executable, "-m", "pigeon.testing.history", str(bad)],
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert proc.returncode == 1, completed(proc)
    assert json.loads(proc.stdout)["valid"] is False, completed(proc)


# --- property test: random valid histories, then one injected bug -------------------------


@st.composite
def histories(draw):
    n = draw(st.integers(1, 25))
    producers = ["p1", "p2", "p3"]
    # The first send succeeds so every history has at least one delivery to tamper with.
    outcomes = ["ok"] + draw(
        st.lists(
            st.sampled_from(["ok", "ok", "ok", "info", "fail"]), min_size=n - 1, max_size=n - 1
        )
    )
    h = Hist()
    sends = []
    for i, outcome in enumerate(outcomes):
        producer = draw(st.sampled_from(producers))
        h.send(f"m{i}", producer=producer, outcome=outcome)
        sends.append((f"m{i}", outcome))
    # First deliveries in send order (so per producer in seq order), later copies flagged.
    delivered = [
        id
        for id, outcome in sends
        if outcome == "ok" or (outcome == "info" and draw(st.booleans()))
    ]
    for id in delivered:
        h.deliver(id, consumer=draw(st.sampled_from(["c1", "c2"])))
    for id in delivered:
        for _ in range(draw(st.integers(0, 2))):
            h.deliver(id, consumer=draw(st.sampled_from(["c1", "c2"])), redelivered=True)
    for id in delivered:
        h.ack(id)
    return h


# About 1 s on a quiet machine, 2.6-5.2 s on a busy one.
@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.data())
def test_random_valid_history_and_injected_bug(h, data):
    r = h.check()
    assert r.valid, str(r)

    deliveries = [i for i, e in enumerate(h.events) if e.f == "deliver"]
    ok_ids = {e.id for e in h.events if e.f == "send" and e.type == "ok"}
    dups = [i for i in deliveries if h.events[i].redelivered]
    bugs = ["corrupt"]
    if any(h.events[i].id in ok_ids for i in deliveries):
        bugs.append("lost")
    if dups:
        bugs.append("unmarked")
    bug = data.draw(st.sampled_from(bugs))
    events = list(h.events)
    if bug == "lost":
        victim = data.draw(st.sampled_from(sorted({h.events[i].id for i in deliveries} & ok_ids)))
        events = [e for e in events if not (e.f in ("deliver", "ack") and e.id == victim)]
        assert victim in check(events).lost
    elif bug == "unmarked":
        i = data.draw(st.sampled_from(dups))
        victim = events[i].id
        events[i] = replace(events[i], redelivered=False)
        assert victim in check(events).unmarked_duplicates
    else:
        i = data.draw(st.sampled_from(deliveries))
        victim = events[i].id
        events[i] = replace(events[i], sha=sha(b"tampered"))
        assert victim in check(events).corrupt
    assert not check(events).valid


# --- real processes killed mid-stream ------------------------------------------------------

WRITER = """
import sys
from pigeon.testing.history import HistoryWriter
path, name = sys.argv[1], sys.argv[2]
w = HistoryWriter(path, process=name)
i = 0
while True:
    body = b"x" * (i % 500)
    w.send_invoke("q", f"{name}-{i}", producer=name, seq=i, body=body)
    w.send_ok("q", f"{name}-{i}")
    w.deliver("q", f"{name}-{i}", redelivered=False, attempt=1, body=body, consumer=name)
    i += 1
"""


def test_processes_killed_with_sigkill_leave_loadable_histories(tmp_path):
    paths = [tmp_path / "w1.jsonl", tmp_path / "w2.jsonl"]
    errs = [tmp_path / "w1.err", tmp_path / "w2.err"]
    procs = []
    for n, (path, err) in enumerate(zip(paths, errs, strict=True), 1):
        with open(err, "wb") as stderr:
            procs.append(
                subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{n}"], stderr=stderr)
            )

    def report() -> str:
        return "\n".join(
            describe(f"writer w{n}", proc.poll(), err)
            for n, (proc, err) in enumerate(zip(procs, errs, strict=True), 1)
        )

    try:
        deadline = time.monotonic() + 20
        while not all(p.exists() and p.stat().st_size > 20_000 for p in paths):
            if time.monotonic() >= deadline or any(proc.poll() is not None for proc in procs):
                pytest.fail(f"writers did not get going\n{report()}")
            time.sleep(0.01)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert all(proc.returncode == -signal.SIGKILL for proc in procs), report()

    events = load_history(paths)
    assert {e.proc for e in events} == {"w1", "w2"}
    assert [e.t for e in events] == sorted(e.t for e in events)
    r = check(events)
    # The last send may have been cut before its delivery was written, and nothing else.
    assert r.unexpected == set() and r.corrupt == set() and r.order_inversions == set()
    assert len(r.lost) <= 2, str(r)
