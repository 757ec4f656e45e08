"""``pigeon demo`` as a user runs it: a real command, real processes."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time

import brokers
import pytest
from brokers import completed, describe, port_taken

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]


def run_demo(*args: str, timeout: float = 120) -> tuple[int, str, dict]:
    """Run the demo to the end; its exit code, stdout and JSON summary.

    The brokerless demo picks its ports before binding them; when one was
    taken meanwhile by someone else, the run is repeated.
    """
    for attempt in range(3):
        done = subprocess.run(
            [*PIGEON, "demo", *args, "--json"], capture_output=True, text=True, timeout=timeout
        )
        if not (port_taken(done.stderr) and attempt < 2):
            break
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"no JSON summary\n{completed(done, 'pigeon demo')}") from None
    assert isinstance(summary, dict), completed(done, "pigeon demo")
    summary["_report"] = completed(done, "pigeon demo")
    return done.returncode, done.stdout, summary


def assert_everyone_worked(summary: dict) -> None:
    report = summary["_report"]
    assert summary["lost"] == 0, report
    assert summary["produced"] > 0 and summary["processed"] == summary["produced"], report
    assert set(summary["by_processor"]) == {"processor-1", "processor-2", "processor-3"}, report
    assert set(summary["by_responder"]) == {"upper", "lower"}, report
    assert all(n > 0 for n in summary["by_processor"].values()), report
    assert all(n > 0 for n in summary["by_responder"].values()), report


@pytest.mark.timeout(150)
def test_demo_in_one_process() -> None:
    code, out, summary = run_demo("--seconds", "3", "--rate", "50")
    assert code == 0, summary["_report"]
    assert_everyone_worked(summary)
    # Each processed word is printed with its processor's number, as in the seed.
    first = out.splitlines()[0].split()
    assert first[0] in {"1", "2", "3"} and first[1].isalpha(), summary["_report"]


@pytest.mark.timeout(300)
def test_demo_chaos_loses_nothing() -> None:
    code, out, summary = run_demo(
        "--processes", "--chaos", "--seconds", "8", "--rate", "50", timeout=240
    )
    assert code == 0, summary["_report"]
    assert_everyone_worked(summary)
    assert [k["role"] for k in summary["kills"]] == ["processor-2", "responder-lower"]
    assert "chaos: kill -9 processor-2" in out, summary["_report"]
    assert "chaos: restarted responder-lower" in out, summary["_report"]


@pytest.mark.timeout(300)
def test_demo_secure_makes_its_keys_and_loses_nothing() -> None:
    code, _out, summary = run_demo(
        "--processes", "--secure", "--chaos", "--seconds", "8", "--rate", "30", timeout=240
    )
    assert code == 0, summary["_report"]
    assert_everyone_worked(summary)


def is_word_line(line: str) -> bool:
    parts = line.split()
    return len(parts) == 2 and parts[0] in {"1", "2", "3"} and parts[1].isalpha()


@pytest.mark.timeout(150)
def test_demo_stops_cleanly_on_ctrl_c(tmp_path) -> None:
    err = tmp_path / "demo.err"
    for attempt in range(3):
        proc, seen = start_demo_until_a_word(err)
        if proc is not None:
            break
        # A port it picked was taken before it bound it (see run_demo).
        assert port_taken(err.read_text()) and attempt < 2, seen
    assert proc is not None and proc.stdout is not None
    try:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    out = seen + rest
    report = describe("pigeon demo", proc.returncode, err, out)
    assert proc.returncode == 0, report
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"no JSON summary\n{report}") from None
    assert summary["produced"] > 0 and summary["lost"] == 0, report


def start_demo_until_a_word(err) -> tuple[subprocess.Popen[str] | None, str]:  # type: ignore[no-untyped-def]
    """Start the demo and read its output until the first processed word
    ("<processor number> <word>"): the demo and what it said. None instead
    of the demo if it ended first because a port it picked was taken."""
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [*PIGEON, "demo", "--rate", "20", "--json"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    seen = line = ""
    try:
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while not is_word_line(line):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise AssertionError(describe("no word within 60 s", proc.poll(), err, seen))
                line = proc.stdout.readline()
                if not line:
                    code = proc.wait(10)
                    if port_taken(err.read_text()):
                        proc.stdout.close()
                        return None, seen
                    raise AssertionError(describe("the demo ended", code, err, seen))
                seen += line
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        raise
    return proc, seen


def test_demo_refuses_bad_options() -> None:
    for args in (["--rate", "0"], ["--url", "ftp://x"]):
        done = subprocess.run([*PIGEON, "demo", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode != 0, completed(done)
        assert "pigeon demo:" in done.stderr, completed(done)


@pytest.mark.timeout(300)
def test_demo_durable_chaos_kills_the_queue_host_too() -> None:
    code, out, summary = run_demo(
        "--durable", "--processes", "--chaos", "--seconds", "10", "--rate", "50", timeout=240
    )
    assert code == 0, summary["_report"]
    assert_everyone_worked(summary)
    kills = [k["role"] for k in summary["kills"]]
    assert kills == ["processor-2", "responder-lower", "fountain"], summary["_report"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("url", [brokers.NATS_URL, brokers.AMQP_URL], ids=["nats", "amqp"])
def test_demo_on_a_broker(url: str) -> None:
    brokers.require(url)
    if url.startswith("amqp"):
        # As on a new user's broker: the demo's queue is declared as it starts.
        # (RabbitMQ refused the first words on a channel opened before the
        # quorum queue had its leader; the publisher now sends them again.)
        brokers.delete_amqp_queues(url, ["words", "words.dead"])
    code, out, summary = run_demo("--seconds", "3", "--rate", "50", "--url", url)
    assert code == 0, summary["_report"]
    assert_everyone_worked(summary)
