"""Reading single keys from a terminal, for live views (``q`` quits)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator

QUIT_KEYS = frozenset("qQ")


@contextlib.contextmanager
def quit_keys() -> Iterator[asyncio.Event]:
    """An event set when q is pressed, while the terminal reads keys one by
    one (no Enter needed); off a terminal the event is never set."""
    quit_pressed = asyncio.Event()
    stdin = sys.stdin
    if not stdin.isatty():
        yield quit_pressed
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def read() -> None:
        keys = stdin.read(1)
        if keys and keys in QUIT_KEYS:
            quit_pressed.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, read)
    try:
        yield quit_pressed
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
