"""``pigeon demo`` as a user runs it: a real command, real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import brokers
import pytest

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]


def run_demo(*args: str, timeout: float = 60) -> tuple[int, str, dict]:
    done = subprocess.run(
        [*PIGEON, "demo", *args, "--json"], capture_output=True, text=True, timeout=timeout
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return done.returncode, done.stdout, summary


def assert_everyone_worked(summary: dict) -> None:
    assert summary["lost"] == 0
    assert summary["produced"] > 0 and summary["processed"] == summary["produced"]
    assert set(summary["by_processor"]) == {"processor-1", "processor-2", "processor-3"}
    assert set(summary["by_responder"]) == {"upper", "lower"}
    assert all(n > 0 for n in summary["by_processor"].values())
    assert all(n > 0 for n in summary["by_responder"].values())


def test_demo_in_one_process() -> None:
    code, out, summary = run_demo("--seconds", "3", "--rate", "50")
    assert code == 0
    assert_everyone_worked(summary)
    # Each processed word is printed with its processor's number, as in the seed.
    first = out.splitlines()[0].split()
    assert first[0] in {"1", "2", "3"} and first[1].isalpha()


@pytest.mark.timeout(90)
def test_demo_chaos_loses_nothing() -> None:
    code, out, summary = run_demo(
        "--processes", "--chaos", "--seconds", "8", "--rate", "50", timeout=80
    )
    assert code == 0, out
    assert_everyone_worked(summary)
    assert [k["role"] for k in summary["kills"]] == ["processor-2", "responder-lower"]
    assert "chaos: kill -9 processor-2" in out and "chaos: restarted responder-lower" in out


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [*PIGEON, "demo", "--rate", "20", "--json"], stdout=subprocess.PIPE, text=True
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["produced"] > 0 and summary["lost"] == 0


def test_demo_refuses_bad_options() -> None:
    for args in (["--rate", "0"], ["--url", "ftp://x"]):
        done = subprocess.run([*PIGEON, "demo", *args], capture_output=True, text=True, timeout=20)
        assert done.returncode != 0
        assert "pigeon demo:" in done.stderr


@pytest.mark.timeout(90)
def test_demo_durable_chaos_kills_the_queue_host_too() -> None:
    code, out, summary = run_demo(
        "--durable", "--processes", "--chaos", "--seconds", "10", "--rate", "50", timeout=80
    )
    assert code == 0, out
    assert_everyone_worked(summary)
    assert [k["role"] for k in summary["kills"]] == ["processor-2", "responder-lower", "fountain"]


@pytest.mark.parametrize("url", [brokers.NATS_URL, brokers.AMQP_URL], ids=["nats", "amqp"])
def test_demo_on_a_broker(url: str) -> None:
    code, out, summary = run_demo("--seconds", "3", "--rate", "50", "--url", brokers.require(url))
    assert code == 0, out
    assert_everyone_worked(summary)
