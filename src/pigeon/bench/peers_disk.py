"""The disk's own floor for a durable confirm: one fsync per write.

A durable queue confirms a send once it is on disk. Awaiting each send
therefore costs at least one fsync of the store, unless the store commits
several producers' sends together; this row measures that floor on the
filesystem where the durable rows keep their stores (the temporary
directory).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from pigeon.bench.harness import Ctl, reporting
from pigeon.bench.shapes import run_alone

RECORD = b"x" * 16


def fsync_writer(ctl: Ctl) -> None:
    """Append RECORD to a file and fsync after each write, for ``seconds``."""
    with reporting(ctl):
        path = os.path.join(ctl.cfg["dir"], "fsync.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            writes = 0
            t0 = time.perf_counter()
            end = t0 + ctl.cfg["seconds"]
            while time.perf_counter() < end:
                os.write(fd, RECORD)
                os.fsync(fd)
                writes += 1
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
        ctl.results.put({"n": writes, "elapsed": elapsed})


def fsync_per_write(opts: Any) -> dict[str, Any]:
    """16 B appended and fsynced, one write at a time; writes/s."""
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        row = run_alone(fsync_writer, {"dir": tmp}, opts.seconds)
    return {**row, "note": f"writes/s in {tempfile.gettempdir()}"}
