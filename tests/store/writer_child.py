"""Run as a separate process by the crash test: write batches until killed.

Usage: python writer_child.py DB_PATH SEED [MIN_FREE_DISK]

Prints ``ready`` once the store is open, then, after each ``apply`` has
returned, the ids of that batch on one line. Batch sizes come from
``random.Random(SEED)`` alone, so the parent can recompute the boundaries.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pigeon.message import Message
from pigeon.store import Put, SqliteStore


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    floor = {"min_free_disk": int(sys.argv[3])} if len(sys.argv) > 3 else {}
    sizes = random.Random(seed)
    with SqliteStore(path, **floor) as store:
        print("ready", flush=True)
        n = 0
        while True:
            size = sizes.randint(1, 50)
            batch = [f"{n + i:08d}" for i in range(size)]
            store.apply([Put("q", Message(id=i, body=os.urandom(100))) for i in batch])
            n += size
            sys.stdout.write(" ".join(batch) + "\n")
            sys.stdout.flush()


def write_then_kill(
    path: Path,
    seed: int,
    lines: int = 40,
    *,
    pause: float = 0.0,
    min_free_disk: int | None = None,
) -> list[str]:
    """For the parent: run this script on ``path``, SIGKILL it ``pause``
    seconds after ``lines`` confirmed batches; return every id it confirmed."""
    floor = [] if min_free_disk is None else [str(min_free_disk)]
    proc = subprocess.Popen(
        [sys.executable, __file__, str(path), str(seed), *floor],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        if proc.stdout.readline() != "ready\n":
            code = proc.wait(timeout=10)
            pytest.fail(f"writer: exit code {code}\n{proc.stderr.read()}")
        out = [proc.stdout.readline() for _ in range(lines)]
        time.sleep(pause)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        out += proc.stdout.read().splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        errors = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"writer: exit code {proc.returncode}\n{errors}"
    return [i for line in out if line.endswith("\n") for i in line.split()]


if __name__ == "__main__":
    main()
