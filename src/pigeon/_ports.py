"""Loopback ports for addresses that must be known before anything binds them
(the demo wires its processes together this way, and so do the tests)."""

from __future__ import annotations

import random
import socket

_handed_out: set[int] = set()  # ports quiet_port returned in this process


def quiet_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    The address must be known before the node binds (a node restarted at
    the same index binds it again). A port the kernel hands out for port 0
    lies in the ephemeral range, where any process's next outgoing
    connection may take it before the node binds; below that range only
    another explicit bind can, and this process does not hand out the same
    port twice (the demo picks several at once, and two alike would make
    one of its nodes fail to bind).
    """
    low, high = 20_000, 32_000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    if len(_handed_out) >= (high - low) // 2:
        _handed_out.clear()  # (a process that asked for thousands: start over)
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise OSError("no free loopback port below the ephemeral range")
