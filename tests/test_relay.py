"""The fault relay itself (pigeon.testing.relay): bytes arrive whole and in
order, a delay delays, a stall holds data then lets it go, a cut resets and
refuses, heal undoes both, and closing stops every thread and socket.

Plain blocking sockets on both ends: the relay runs its own loop in its own
thread. Waits are for conditions, with bounds far above what a quiet machine
needs; the only timings asserted are lower bounds the relay must impose.
"""

from __future__ import annotations

import doctest
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import pigeon
from pigeon.testing import relay as relay_module
from pigeon.testing.relay import Direction, Relay

WAIT = 30.0  # bound for what takes well under a second on a quiet machine


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pigeon-relay-")]


@pytest.fixture(autouse=True)
def no_relay_left_running() -> Iterator[None]:
    yield
    assert relay_threads() == [], "a relay was left running"


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """The relay's target: a listening socket the test accepts on itself."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    yield sock
    sock.close()


@pytest.fixture
def sockets() -> Iterator[Callable[[socket.socket], socket.socket]]:
    """Registers sockets to close after the test."""
    opened: list[socket.socket] = []

    def keep(sock: socket.socket) -> socket.socket:
        sock.settimeout(WAIT)
        opened.append(sock)
        return sock

    yield keep
    for sock in opened:
        sock.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def through(
    relay: Relay, server: socket.socket, keep: Callable[[socket.socket], socket.socket]
) -> tuple[socket.socket, socket.socket]:
    """A client connected through ``relay`` and the target's end of it."""
    client = keep(socket.create_connection(relay.address, timeout=WAIT))
    peer, _ = server.accept()
    return client, keep(peer)


def receive(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            raise AssertionError(f"connection closed after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def nothing_to_read(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(WAIT)
    return False


def is_reset(sock: socket.socket) -> bool:
    """The connection ended (by a reset or an EOF) rather than timing out."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def reset_on_arrival(address: tuple[str, int]) -> bool:
    """A new connection to ``address`` is reset, during connect (on loopback
    the reset can come before connect returns) or just after."""
    try:
        sock = socket.create_connection(address, timeout=WAIT)
    except ConnectionResetError:
        return True
    with sock:
        sock.settimeout(WAIT)
        return is_reset(sock)


def test_bytes_arrive_whole_and_in_order_both_ways_despite_jitter(server, sockets) -> None:
    # Jitter as large as the delay and writes a millisecond apart: without
    # Rule 2 (never before the chunk read before), chunks would overtake.
    pieces = [os.urandom(97 + i % 400) for i in range(400)]
    bulk = os.urandom(3 << 20)
    sent = b"".join(pieces) + bulk
    with Relay(server.getsockname(), delay=0.01, jitter=0.01, seed=7) as relay:
        client, peer = through(relay, server, sockets)

        def send_slowly(sock: socket.socket) -> None:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.001)
            sock.sendall(bulk)

        # The peer answers with the same stream, so both directions carry it.
        senders = [
            threading.Thread(target=send_slowly, args=(client,)),
            threading.Thread(target=send_slowly, args=(peer,)),
        ]
        for thread in senders:
            thread.start()
        at_peer = receive(peer, len(sent))
        at_client = receive(client, len(sent))
        for thread in senders:
            thread.join(WAIT)
        assert at_peer == sent
        assert at_client == sent
        stats = relay.stats()
        assert (stats.bytes_to_target, stats.bytes_to_client) == (len(sent), len(sent))
        assert (stats.accepted, stats.connected, stats.open) == (1, 1, 1)
        assert (stats.held_to_target, stats.held_to_client) == (0, 0)


def test_a_delay_holds_each_chunk_at_least_delay_minus_jitter(server, sockets) -> None:
    with Relay(server.getsockname()) as relay:
        relay.set_delay(0.3, jitter=0.1, direction=Direction.TO_TARGET)
        client, peer = through(relay, server, sockets)
        for _ in range(3):
            started = time.monotonic()
            client.sendall(b"x")
            assert peer.recv(1) == b"x"
            assert time.monotonic() - started >= 0.2
        # Now both ways: a round trip takes at least both delays.
        relay.set_delay(0.3, jitter=0.1, direction=Direction.TO_CLIENT)
        started = time.monotonic()
        client.sendall(b"y")
        assert peer.recv(1) == b"y"
        peer.sendall(b"z")
        assert client.recv(1) == b"z"
        assert time.monotonic() - started >= 0.4


def test_a_stall_holds_the_data_then_lets_it_go_in_order(server, sockets) -> None:
    data = os.urandom(200_000)
    with Relay(server.getsockname()) as relay:
        client, peer = through(relay, server, sockets)
        relay.stall()  # until healed
        client.sendall(data)
        wait_for(lambda: relay.stats().held_to_target == len(data), "the relay to hold it all")
        time.sleep(0.2)  # time in which nothing may be forwarded
        assert nothing_to_read(peer)
        assert relay.stats().bytes_to_target == 0
        relay.heal()
        assert receive(peer, len(data)) == data
        assert relay.stats().held_to_target == 0

        # A timed stall ends by itself, and holds for at least its length.
        relay.stall(0.5, direction=Direction.TO_CLIENT)
        started = time.monotonic()
        peer.sendall(b"late")
        client.sendall(b"free")  # the other way is not stalled
        assert receive(peer, 4) == b"free"
        assert receive(client, 4) == b"late"
        assert time.monotonic() - started >= 0.45


def test_a_stall_holds_at_most_max_held_bytes_then_tcp_pushes_back(server, sockets) -> None:
    limit = 64 * 1024
    # Far more than the kernel's socket buffers on both hops can take.
    data = os.urandom(64 << 20)
    done = threading.Event()
    with Relay(server.getsockname(), max_held_bytes=limit) as relay:
        client, peer = through(relay, server, sockets)
        relay.stall()

        def send_all() -> None:
            try:
                client.sendall(data)
            finally:
                done.set()

        sender = threading.Thread(target=send_all)
        sender.start()
        try:
            wait_for(lambda: relay.stats().held_to_target == limit, "the relay to fill up")
            time.sleep(0.3)  # time in which the relay must not read more
            stats = relay.stats()
            assert stats.held_to_target == limit
            assert stats.bytes_to_target == 0
            assert not done.is_set(), "the sender should be held back by TCP"
        finally:
            relay.heal()
            got = receive(peer, len(data))
            sender.join(WAIT)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert relay.stats().bytes_to_target == len(data)


def test_a_cut_resets_every_connection_and_refuses_new_ones_until_healed(server, sockets) -> None:
    with Relay(server.getsockname()) as relay:
        pairs = [through(relay, server, sockets) for _ in range(2)]
        for client, peer in pairs:
            client.sendall(b"a")
            assert peer.recv(1) == b"a"
        assert relay.cut(refuse=True) == 2
        for client, peer in pairs:
            assert is_reset(client)
            assert is_reset(peer)
        # Partitioned: a new connection is reset on arrival and the target
        # never hears of it.
        assert reset_on_arrival(relay.address)
        stats = relay.stats()
        assert (stats.cut, stats.refused, stats.connected, stats.open) == (2, 1, 2, 0)

        relay.heal()
        client, peer = through(relay, server, sockets)
        client.sendall(b"b")
        assert peer.recv(1) == b"b"
        peer.sendall(b"c")
        assert client.recv(1) == b"c"

        # A cut without refuse: the next connection goes through at once.
        assert relay.cut() == 1
        assert is_reset(client)
        client, peer = through(relay, server, sockets)
        client.sendall(b"d")
        assert peer.recv(1) == b"d"
        assert relay.stats().refused == 1


def test_heal_ends_a_stall_early_and_keeps_the_delay(server, sockets) -> None:
    with Relay(server.getsockname()) as relay:
        client, peer = through(relay, server, sockets)
        relay.set_delay(0.2)
        relay.stall(600)
        client.sendall(b"held")
        wait_for(lambda: relay.stats().held_to_target == 4, "the relay to hold it")
        relay.heal()
        assert receive(peer, 4) == b"held"  # long before the stall's 600 s
        started = time.monotonic()
        client.sendall(b"x")
        assert peer.recv(1) == b"x"
        assert time.monotonic() - started >= 0.2
        relay.set_delay(0)
        client.sendall(b"y")
        assert peer.recv(1) == b"y"


def test_closing_stops_the_thread_and_every_socket(server, sockets) -> None:
    relay = Relay(server.getsockname())
    client, peer = through(relay, server, sockets)
    assert len(relay_threads()) == 1
    relay.close()
    assert relay_threads() == []
    assert is_reset(client)
    assert is_reset(peer)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(relay.address, timeout=WAIT).close()
    with pytest.raises(pigeon.ClosedError):
        relay.stats()
    with pytest.raises(pigeon.ClosedError):
        relay.cut()
    relay.close()  # twice is fine
    assert relay.closed


def test_a_target_that_is_down_resets_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
        with Relay(unused.getsockname()) as relay:
            assert reset_on_arrival(relay.address)
            wait_for(lambda: relay.stats().failed == 1, "the failure to be counted")


@pytest.mark.parametrize(
    "target",
    ["tcp://10.1.2.3:80", "tcp://example.com:80", "udp://127.0.0.1:80", ("192.168.0.1", 80)],
)
def test_only_loopback_targets(target) -> None:
    with pytest.raises(pigeon.ConfigurationError):
        Relay(target)


def test_durations_are_checked(server) -> None:
    with pytest.raises(pigeon.ConfigurationError):
        Relay(server.getsockname(), delay=-1)
    with Relay(server.getsockname()) as relay:
        for bad in (float("nan"), float("inf"), -0.1):
            with pytest.raises(pigeon.ConfigurationError):
                relay.set_delay(bad)
            with pytest.raises(pigeon.ConfigurationError):
                relay.stall(bad)
        assert relay.url == f"tcp://127.0.0.1:{relay.port}"


def test_the_module_example_runs() -> None:
    results = doctest.testmod(relay_module)
    assert results.attempted > 0
    assert results.failed == 0
