"""A copy of an app with one schedule, for the schedule tests.

Run as ``python tests/scheduleproc.py URL NAME PERIOD``. It prints
``ready`` once its schedule runs, ``fired <start ms> <late ms>`` for each
period it runs (the scheduled start, and how long after it the run began),
and on SIGTERM stops cleanly and prints ``stats <json>``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from datetime import datetime

import pigeon


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    url, name, period = sys.argv[1], sys.argv[2], float(sys.argv[3])
    app = pigeon.App(url, heartbeat=0.2) if url.startswith("tcp://") else pigeon.App(url)

    @app.every(period, name=name)
    def beat(at: datetime) -> None:
        start = at.timestamp()
        say(f"fired {round(start * 1000)} {round((time.time() - start) * 1000)}")

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await app.start()
        say("ready")
        try:
            await stop.wait()
        finally:
            await app.stop()
        say("stats " + json.dumps(app.schedule_stats()))

    asyncio.run(run())


if __name__ == "__main__":
    main()
