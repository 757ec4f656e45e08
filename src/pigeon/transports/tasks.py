"""Starting a task for each request or delivery, as cheaply as the running
Python allows."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Python 3.12 can run a task's first step at once, inside the call that
# creates it, as a real task (current_task(), contextvars and timeouts all
# behave). A handler that never waits then finishes there, with no loop
# callback at all. Older Pythons schedule the first step as usual.
_EAGER = sys.version_info >= (3, 12)


def start_task(
    coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Task[T]:
    """Start ``coro`` as a task on ``loop`` (default: the running one); on
    Python 3.12+ its first step runs now."""
    if loop is None:
        loop = asyncio.get_running_loop()
    if _EAGER:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
    return loop.create_task(coro)
