"""The seed's own programs (examples/seed, raw pyzmq) mixed with pigeon
through ``pigeon bridge``: real processes over tcp loopback."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from brokers import free_tcp
from seedmix import PIGEON, PY, SEED, Procs

WORDS = 40


@pytest.mark.timeout(240)
def test_seed_fountain_and_responders_with_pigeon_processors(tmp_path) -> None:
    """Seed fountain → bridge --pull → queue → pigeon processors → service
    `case` → bridge --rep → the seed's two REP responders."""
    fountain, node, upper, lower = (free_tcp() for _ in range(4))
    procs = Procs(tmp_path)
    try:
        procs.start("upper", PY, str(SEED / "responder.py"), upper, "upper")
        procs.start("lower", PY, str(SEED / "responder.py"), lower, "lower")
        procs.start(
            "bridge",
            *PIGEON,
            "bridge",
            "--node",
            f"bind:{node}",
            "--pull",
            f"{fountain}=words",
            "--rep",
            f"case={upper},{lower}",
            "--json",
        )
        procs.wait_for("bridge running", lambda: len(procs.lines("bridge")) >= 3)
        for n in (1, 2, 3):
            procs.start(f"processor-{n}", PY, "-m", "pigeon.cli.demo_seed", str(n), node)
        procs.start(
            "fountain",
            PY,
            str(SEED / "fountain.py"),
            fountain,
            "--count",
            str(WORDS),
            "--interval",
            "0.05",
            "--echo",
        )
        procs.wait_for("the fountain sent its words", lambda: procs.started["fountain"].poll() == 0)
        sent = Counter(line.split()[1] for line in procs.lines("fountain"))
        assert sum(sent.values()) == WORDS, procs.report()

        def processed() -> list[dict]:
            events = []
            for n in (1, 2, 3):
                for line in procs.lines(f"processor-{n}"):
                    event = json.loads(line)
                    if event["ev"] == "processed":
                        events.append(event)
            return events

        procs.wait_for("every word processed", lambda: len(processed()) >= WORDS)
        events = processed()
        assert Counter(e["word"].lower() for e in events) == sent, procs.report()
        assert len({e["id"] for e in events}) == WORDS, procs.report()
        assert {e["responder"] for e in events} == {"upper", "lower"}, procs.report()
        for e in events:
            assert e["word"] in (e["word"].upper(), e["word"].lower())

        assert procs.stop("bridge") == 0, procs.report()
        stats = json.loads(procs.lines("bridge")[-1])["bridges"]
        pull, rep = stats
        assert (pull["kind"], pull["received"], pull["passed"]) == ("pull", WORDS, WORDS), stats
        assert pull["malformed"] == pull["dropped"] == 0, stats
        assert (rep["kind"], rep["passed"], rep["dropped"]) == ("rep", WORDS, 0), stats
    finally:
        procs.kill_all()


@pytest.mark.timeout(240)
def test_pigeon_fountain_and_responders_with_seed_processors(tmp_path) -> None:
    """pigeon's fountain → queue → bridge --push → the seed's three raw
    processors → bridge --req → service `case` → pigeon's two responders."""
    fountain, upper, lower, push, req = (free_tcp() for _ in range(5))
    procs = Procs(tmp_path)
    roles = [PY, "-m", "pigeon.cli.demo_roles"]
    try:
        for case, url in (("upper", upper), ("lower", lower)):
            procs.start(case, *roles, "responder", json.dumps({"case": case, "bind": url}))
        procs.start(
            "fountain",
            *roles,
            "fountain",
            json.dumps({"rate": 20, "seconds": 2.0, "bind": fountain}),
        )
        procs.start(
            "bridge",
            *PIGEON,
            "bridge",
            "--node",
            fountain,
            "--node",
            upper,
            "--node",
            lower,
            "--push",
            f"{push}=words",
            "--req",
            f"{req}=case",
            "--json",
        )
        for n in (1, 2, 3):
            procs.start(f"processor-{n}", PY, str(SEED / "processor.py"), str(n), push, req)

        def fountain_events(kind: str) -> list[dict]:
            return [e for e in map(json.loads, procs.lines("fountain")) if e["ev"] == kind]

        procs.wait_for("the fountain done producing", lambda: fountain_events("producing_done"))
        produced = Counter(e["word"] for e in fountain_events("produced"))
        assert sum(produced.values()) > 0, procs.report()

        def processed() -> list[tuple[str, dict]]:
            out = []
            for n in (1, 2, 3):
                for line in procs.lines(f"processor-{n}"):
                    number, _, reply = line.partition(" ")
                    out.append((number, json.loads(reply)))
            return out

        procs.wait_for("every word processed", lambda: len(processed()) >= sum(produced.values()))
        replies = processed()
        assert Counter(r["word"].lower() for _, r in replies) == produced, procs.report()
        assert {r["by"] for _, r in replies} == {"upper", "lower"}, procs.report()

        assert procs.stop("bridge") == 0, procs.report()
        stats = json.loads(procs.lines("bridge")[-1])["bridges"]
        push_stats, req_stats = stats
        total = sum(produced.values())
        assert (push_stats["kind"], push_stats["passed"], push_stats["dropped"]) == (
            "push",
            total,
            0,
        ), stats
        assert (req_stats["kind"], req_stats["passed"], req_stats["failed"]) == (
            "req",
            total,
            0,
        ), stats
    finally:
        procs.kill_all()


@pytest.mark.timeout(240)
def test_demo_with_seed(tmp_path) -> None:
    import subprocess

    done = subprocess.run(
        [*PIGEON, "demo", "--with-seed", "--seconds", "3", "--rate", "10", "--json"],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0 and summary["processed"] == summary["produced"] == 30, summary
    assert set(summary["by_responder"]) == {"upper", "lower"}, summary
