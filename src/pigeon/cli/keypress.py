"""Reading single keys from a terminal, for live views (``q`` quits)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator

QUIT_KEYS = frozenset("qQ")


@contextlib.contextmanager
def quit_keys() -> Iterator[asyncio.Event]:
    """An event set when q is pressed, while the terminal reads keys one by
    one (no Enter needed); off a terminal the event is never set."""
    quit_pressed = asyncio.Event()
    stdin = sys.stdin
    if not stdin.isatty() or not _in_foreground(stdin.fileno()):
        # A background job must not touch the terminal's modes (it would be
        # stopped, SIGTTOU): it quits on Ctrl-C or a signal only.
        yield quit_pressed
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def read() -> None:
        # os.read, not stdin.read: a text stream may wait to fill a chunk.
        try:
            keys = os.read(fd, 64).decode("utf-8", "replace")
        except OSError:
            keys = ""
        if not keys:  # the terminal went away: stop reading it
            loop.remove_reader(fd)
        elif QUIT_KEYS & set(keys):
            quit_pressed.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, read)
    try:
        yield quit_pressed
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _in_foreground(fd: int) -> bool:
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        # Not this process's controlling terminal: nothing stops it for
        # changing the modes.
        return True
