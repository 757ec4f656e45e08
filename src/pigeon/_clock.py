"""The one wall-clock reading of scheduling code.

Delayed sends and schedules read wall time only through :func:`wall`, and
wait on the event loop's clock (``loop.call_at``, ``asyncio.sleep``), so a
test clock that shifts both moves every schedule at once.
"""

from __future__ import annotations

import time

# Seconds a test clock (``pigeon.testing.TestApp``) has moved wall time
# ahead; 0.0 outside a test, so a reading costs one addition.
_shift = 0.0


def wall() -> float:
    """Seconds since the epoch, now (as a test clock has moved it)."""
    return time.time() + _shift


def shift_wall(seconds: float) -> None:
    """Move :func:`wall` by ``seconds`` (negative to move it back): the
    hook a test clock moves wall time with, along with its loop's clock."""
    global _shift
    _shift += seconds
