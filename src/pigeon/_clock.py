"""The one wall-clock reading of scheduling code.

Delayed sends and schedules read wall time only through :func:`wall`, and
wait on the event loop's clock (``loop.call_at``, ``asyncio.sleep``), so a
test clock that shifts both moves every schedule at once.
"""

from __future__ import annotations

import time


def wall() -> float:
    """Seconds since the epoch, now."""
    return time.time()
