"""Finding nodes by name, not address (``discover=``): real nodes on tcp
loopback, a node file that changes under a running client, DNS names, and an
in-test DNS server for SRV records.

Every wait polls for a condition with a generous deadline: nothing here
depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pigeon
from pigeon.testing.conformance import wait_until

WAIT = 30.0  # seconds any one condition may take on a busy machine
FAST = 0.05  # discover_interval: look often, so the tests do not wait on it


def bound(conn: pigeon.Connection) -> str:
    return str(conn.stats()["bound"][0])


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def write_nodes(path: Path, *addresses: str) -> None:
    """Replace the node file at once (write aside, then rename), as the
    docs advise: a reader never sees it half-written."""
    aside = path.with_suffix(".tmp")
    aside.write_text("# test nodes\n" + "".join(f"{a}\n" for a in addresses))
    os.replace(aside, path)


def linked(conn: pigeon.Connection) -> set[str]:
    return set(conn.stats()["links"])


async def server(
    name: str, hold: asyncio.Event | None = None
) -> tuple[pigeon.Connection, list[str]]:
    """A node serving ``who``, answering its name; with ``hold``, a call whose
    body is ``hold`` waits for that event first. Returns the node and the
    bodies of the calls it started."""
    node = await pigeon.connect(bind="tcp://127.0.0.1:0")
    started: list[str] = []

    async def who(message: pigeon.Message) -> str:
        started.append(message.text)
        if hold is not None and message.text == "hold":
            await hold.wait()
        return name

    await node.serve("who", who)
    return node, started


async def answers_from(client: pigeon.Connection, names: set[str], timeout: float = WAIT) -> None:
    """Call ``who`` until every one of ``names`` has answered."""
    seen: set[str] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    while not names <= seen:
        assert asyncio.get_running_loop().time() < deadline, f"only {seen} answered, not {names}"
        try:
            seen.add((await client.request("who", "?", timeout=5.0)).text)
        except pigeon.NoResponders:
            await asyncio.sleep(0.02)  # the new link's handshake is not done yet


# -- a file of addresses ------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_client_follows_its_node_file_without_a_failed_call(tmp_path: Path) -> None:
    """A client starts with one server; a second server's address added to
    the file is linked and used; the first, removed, is unlinked, and the
    calls it held move to the second: no call fails throughout."""
    nodes = tmp_path / "nodes.txt"

    async def scenario() -> None:
        release = asyncio.Event()
        a, a_started = await server("a", hold=release)
        b, _ = await server("b")
        try:
            write_nodes(nodes, bound(a))
            async with pigeon.connect(discover=f"file://{nodes}", discover_interval=FAST) as client:
                await answers_from(client, {"a"})
                assert linked(client) == {bound(a)}

                write_nodes(nodes, bound(a), bound(b))
                await answers_from(client, {"a", "b"})  # both are used
                assert linked(client) == {bound(a), bound(b)}

                # Calls keep going all along; some are held by a, unanswered,
                # when a is taken out of the file.
                failures: list[BaseException] = []
                replies: list[str] = []
                stop = asyncio.Event()

                async def caller() -> None:
                    while not stop.is_set():
                        try:
                            replies.append((await client.request("who", "?", timeout=20)).text)
                        except pigeon.PigeonError as exc:
                            failures.append(exc)
                        await asyncio.sleep(0.005)

                callers = [asyncio.ensure_future(caller()) for _ in range(3)]
                held = [
                    asyncio.ensure_future(client.request("who", "hold", timeout=20))
                    for _ in range(6)
                ]
                # Fewest outstanding first: a takes some of them and holds them.
                await wait_until(lambda: "hold" in a_started, WAIT, "a call held by a")

                write_nodes(nodes, bound(b))
                await wait_until(lambda: linked(client) == {bound(b)}, WAIT, "a unlinked")
                for reply in await asyncio.gather(*held):
                    assert reply.text == "b"  # a never answered them: b did
                count = len(replies)
                await wait_until(lambda: len(replies) >= count + 20, WAIT, "calls after removal")
                stop.set()
                await asyncio.gather(*callers)
                assert failures == []
                assert set(replies[count:]) == {"b"}

                stats = client.stats()
                assert stats["links_added"] == 2 and stats["links_removed"] == 1
                assert stats["discovery_errors"] == 0
                assert stats["discovery"]["nodes"] == [bound(b)]
                assert stats["request_retries"] >= 1  # the held calls moved
        finally:
            release.set()
            await a.close()
            await b.close()

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_a_worker_picks_up_a_new_host_and_lets_go_of_a_removed_one(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.txt"

    async def scenario() -> None:
        got: list[str] = []
        async with (
            pigeon.connect(bind="tcp://127.0.0.1:0") as h1,
            pigeon.connect(bind="tcp://127.0.0.1:0") as h2,
        ):
            write_nodes(nodes, bound(h1))
            # (A Path is a node file.)
            async with pigeon.connect(discover=nodes, discover_interval=FAST) as worker_side:
                await worker_side.consume("jobs", lambda d: got.append(d.message.text))
                await h1.send("jobs", "from h1")
                await wait_until(lambda: "from h1" in got, WAIT, "h1's message")

                write_nodes(nodes, bound(h1), bound(h2))
                await h2.send("jobs", "from h2")  # held by h2 until the worker finds it
                await wait_until(lambda: "from h2" in got, WAIT, "h2's message")

                write_nodes(nodes, bound(h2))
                await wait_until(lambda: linked(worker_side) == {bound(h2)}, WAIT, "h1 unlinked")

                def consumers_on_h1() -> int:
                    return int(h1.stats()["queues"]["jobs"]["consumers"])

                # The worker told h1 it stopped, rather than waiting to be
                # given up for missed heartbeats.
                await wait_until(lambda: consumers_on_h1() == 0, WAIT, "h1 forgets the worker")
                await h2.send("jobs", "h2 again")
                await wait_until(lambda: "h2 again" in got, WAIT, "h2's second message")
                assert sorted(got) == ["from h1", "from h2", "h2 again"]
                assert worker_side.stats()["links_removed"] == 1

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_sends_a_removed_node_never_confirmed_go_to_another_marked_redelivered(
    tmp_path: Path,
) -> None:
    """A send the removed node never confirmed is not dropped: it goes to
    the node the file lists now, flagged redelivered (the removed node may
    have had it), and its caller's future resolves from there."""
    nodes = tmp_path / "nodes.txt"
    nowhere = f"tcp://127.0.0.1:{free_port()}"  # nobody listens: nothing is confirmed

    async def scenario() -> None:
        got: list[pigeon.Message] = []
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as host:
            await host.consume("jobs", lambda d: got.append(d.message))
            write_nodes(nodes, nowhere)
            async with pigeon.connect(
                discover=f"file://{nodes}", discover_interval=FAST
            ) as producer:
                pending = [producer.send_nowait("jobs", f"job {i}") for i in range(5)]
                await asyncio.sleep(0.2)
                assert not any(future.done() for future in pending)
                write_nodes(nodes, bound(host))
                await asyncio.wait_for(asyncio.gather(*pending), WAIT)
                await wait_until(lambda: len(got) == 5, WAIT, "5 deliveries")
                assert sorted(m.text for m in got) == [f"job {i}" for i in range(5)]
                assert all(m.redelivered for m in got)
                stats = producer.stats()
                assert stats["sends_moved"] == 5 and stats["sends_failed_on_removal"] == 0
                assert stats["unconfirmed"] == 0

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_a_durable_outbox_keeps_sends_until_discovery_finds_a_host(tmp_path: Path) -> None:
    """With ``outbox=``, what is on disk reaches the host the source lists
    now: sends of a removed node move to it, and sends restored at start,
    before the source lists any node, are parked until one is found."""
    nodes = tmp_path / "nodes.txt"
    outbox = str(tmp_path / "outbox.db")
    nowhere = f"tcp://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        got: list[pigeon.Message] = []
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as host:
            await host.consume("jobs", lambda d: got.append(d.message))
            write_nodes(nodes, nowhere)
            discover = {"discover": f"file://{nodes}", "discover_interval": FAST}
            async with pigeon.connect(outbox=outbox, **discover) as producer:
                await producer.send("jobs", "moved 1")  # returns once on disk
                await producer.send("jobs", "moved 2")
                write_nodes(nodes, bound(host))
                await wait_until(lambda: len(got) == 2, WAIT, "the moved sends")
                await producer.flush(WAIT)

            write_nodes(nodes, nowhere)
            async with pigeon.connect(outbox=outbox, **discover) as producer:
                await producer.send("jobs", "kept 1")
                await producer.send("jobs", "kept 2")
            nodes.unlink()  # the next run starts before its source lists a node

            async with pigeon.connect(outbox=outbox, **discover) as producer:
                stats = producer.stats()
                assert stats["outbox"]["restored"] == 2 and stats["links"] == {}
                write_nodes(nodes, bound(host))
                await wait_until(lambda: len(got) == 4, WAIT, "the parked sends")
                await producer.flush(WAIT)
            assert sorted(m.text for m in got) == ["kept 1", "kept 2", "moved 1", "moved 2"]
            assert all(m.redelivered for m in got if m.text.startswith("moved"))

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_a_failing_source_keeps_the_last_good_set_and_is_counted(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.txt"

    async def scenario() -> None:
        a, _ = await server("a")
        b, _ = await server("b")
        try:
            # Missing at start: the client starts anyway, counts it, and
            # says why it cannot send.
            async with pigeon.connect(discover=f"file://{nodes}", discover_interval=FAST) as client:
                stats = client.stats()
                assert stats["discovery_errors"] == 1 and stats["links"] == {}
                assert "nodes.txt" in stats["discovery"]["last_error"]
                with pytest.raises(pigeon.TransportError, match="discovery has found none"):
                    await client.send("jobs", "x")
                with pytest.raises(pigeon.NoResponders):
                    await client.request("who", "?", timeout=5)

                write_nodes(nodes, bound(a))
                await answers_from(client, {"a"})
                errors = client.stats()["discovery_errors"]

                nodes.write_text(f"{bound(b)}\nnot an address\n")  # a bad line
                await wait_until(
                    lambda: client.stats()["discovery_errors"] == errors + 1, WAIT, "counted"
                )
                assert "line 2" in client.stats()["discovery"]["last_error"]
                nodes.unlink()  # gone
                await wait_until(
                    lambda: client.stats()["discovery_errors"] == errors + 2, WAIT, "counted"
                )
                nodes.write_text("# nothing listed\n")  # empty
                await wait_until(
                    lambda: client.stats()["discovery_errors"] == errors + 3, WAIT, "counted"
                )
                await asyncio.sleep(10 * FAST)  # looks meanwhile count nothing new
                assert client.stats()["discovery_errors"] == errors + 3
                # Through all of it, the last good set stayed.
                assert linked(client) == {bound(a)}
                assert (await client.request("who", "?", timeout=5)).text == "a"

                write_nodes(nodes, bound(b))
                await wait_until(lambda: linked(client) == {bound(b)}, WAIT, "b linked")
                await answers_from(client, {"b"})
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_static_urls_stay_whatever_the_source_says(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.txt"

    async def scenario() -> None:
        a, _ = await server("a")
        b, _ = await server("b")
        try:
            write_nodes(nodes, bound(a), bound(b))
            async with pigeon.connect(
                bound(a), discover=f"file://{nodes}", discover_interval=FAST
            ) as client:
                assert linked(client) == {bound(a), bound(b)}  # a once, not twice
                write_nodes(nodes, bound(b))
                await asyncio.sleep(10 * FAST)
                write_nodes(nodes, bound(a))  # b goes; a was never the file's
                await wait_until(lambda: linked(client) == {bound(a)}, WAIT, "b unlinked")
                assert client.stats()["links_removed"] == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


# -- DNS ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_dns_name_with_a_port_finds_the_node() -> None:
    async def scenario() -> None:
        a, _ = await server("a")
        try:
            port = port_of(bound(a))
            async with pigeon.connect(discover=f"dns://localhost:{port}") as client:
                # (Where localhost also has an IPv6 address, that link just
                # never comes up: a is on 127.0.0.1 only.)
                assert f"tcp://127.0.0.1:{port}" in client.stats()["discovery"]["nodes"]
                await answers_from(client, {"a"})
                assert client.stats()["discovery_errors"] == 0
        finally:
            await a.close()

    asyncio.run(scenario())


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.timeout(60)
@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_ipv6_address_is_reached() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://[::1]:0") as a:
            await a.serve("who", lambda m: "a")
            async with pigeon.connect(discover=f"dns://[::1]:{port_of(bound(a))}") as client:
                assert client.stats()["discovery"]["nodes"] == [bound(a)]
                await answers_from(client, {"a"})

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_name_that_does_not_resolve_is_counted_not_raised() -> None:
    async def scenario() -> None:
        async with pigeon.connect(discover="dns://no-such-node.invalid:5555") as client:
            stats = client.stats()
            assert stats["discovery_errors"] == 1 and stats["links"] == {}
            assert "no-such-node.invalid" in stats["discovery"]["last_error"]

    asyncio.run(scenario())


class TinyDns:
    """A DNS server on a loopback UDP port, answering from ``zone``: SRV
    names map to ``(port, target)`` lists, host names to IPv4 addresses
    (sent in the additional section of SRV answers). ``failing`` makes it
    answer SERVFAIL."""

    def __init__(self) -> None:
        self.zone: dict[str, Any] = {}
        self.failing = False
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            records = self.zone.get(name)
            self.queries += 1
            if self.failing:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif question.rdtype != dns.rdatatype.SRV or not records:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                texts = [f"0 0 {port} {target}." for port, target in records]
                response.answer.append(dns.rrset.from_text(question.name, 5, "IN", "SRV", *texts))
                for _port, target in records:
                    if target in self.zone:
                        glue = dns.rrset.from_text(f"{target}.", 5, "IN", "A", self.zone[target])
                        response.additional.append(glue)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def tiny_dns() -> Iterator[TinyDns]:
    pytest.importorskip("dns", reason="srv:// needs dnspython (the dns extra)")
    server = TinyDns()
    yield server
    server.close()


@pytest.mark.timeout(120)
def test_srv_records_add_and_remove_nodes(tiny_dns: TinyDns) -> None:
    name = "_pigeon._tcp.nodes.test"

    async def scenario() -> None:
        a, _ = await server("a")
        b, _ = await server("b")
        try:
            # a's target resolves through the system (localhost), b's from
            # the answer's additional section (a name only this server knows).
            tiny_dns.zone[name] = [(port_of(bound(a)), "localhost")]
            tiny_dns.zone["node-b.nodes.test"] = "127.0.0.1"
            async with pigeon.connect(
                discover=f"srv://{name}", nameserver=tiny_dns.address, discover_interval=FAST
            ) as client:
                await answers_from(client, {"a"})
                tiny_dns.zone[name] = [
                    (port_of(bound(a)), "localhost"),
                    (port_of(bound(b)), "node-b.nodes.test"),
                ]
                await answers_from(client, {"a", "b"})

                # The DNS server fails: counted, and the nodes stay.
                tiny_dns.failing = True
                await wait_until(
                    lambda: client.stats()["discovery_errors"] >= 1, WAIT, "a failed lookup"
                )
                assert linked(client) == {bound(a), bound(b)}
                await answers_from(client, {"a", "b"})
                tiny_dns.failing = False

                tiny_dns.zone[name] = [(port_of(bound(b)), "node-b.nodes.test")]
                await wait_until(lambda: linked(client) == {bound(b)}, WAIT, "a unlinked")
                await answers_from(client, {"b"})
                stats = client.stats()
                assert stats["links_added"] == 2 and stats["links_removed"] == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_srv_without_dnspython_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dns.asyncresolver", None)  # as if not installed
    with pytest.raises(pigeon.ConfigurationError, match=r"pigeon-queues\[dns\]"):
        pigeon.connect(discover="srv://_pigeon._tcp.example.internal")


# -- what is refused at once ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        (None, {"discover": "http://nodes.example/list"}, "file://PATH"),
        (None, {"discover": "dns://nodes.example"}, "port"),
        (None, {"discover": "file:///x", "discover_interval": 0}, "discover_interval"),
        (None, {"discover": "file:///x", "nameserver": "127.0.0.1"}, "srv://"),
        (None, {"discover": "srv://_p._tcp.x", "nameserver": "dns.example"}, "IP address"),
        ("tcp://127.0.0.1:5555", {"nameserver": "127.0.0.1"}, "goes with discover="),
        ("memory://x", {"discover": "file:///x"}, "ZeroMQ"),
        ("nats://127.0.0.1:4222", {"discover": "file:///x"}, "ZeroMQ"),
    ],
)
def test_bad_discovery_options_are_configuration_errors(
    url: str | None, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(pigeon.ConfigurationError, match=match):
        pigeon.connect(url, **options)


def test_discover_alone_is_enough_and_connect_still_needs_something() -> None:
    with pytest.raises(pigeon.ConfigurationError, match="discover="):
        pigeon.connect()
    conn = pigeon.connect(discover="file:///nonexistent/nodes.txt")
    assert "discover:file:///nonexistent/nodes.txt" in conn.transport.url


# -- pigeon.info ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_info_reports_a_nodes_services_queues_and_what_its_links_offer() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as host:
            await host.serve("who", lambda m: "host")
            await host.send("jobs", "waiting")
            async with pigeon.connect(bound(host)) as client:
                await answers_from(client, {"host"})
                info = (await client.request("pigeon.info", b"", timeout=5)).decode()
                assert "who" in info["services"] and "pigeon.info" in info["services"]
                assert info["queues"]["jobs"]["ready"] == 1
                assert info["node"]
                (link,) = client.stats()["links"].values()
                assert link["node"] == info["node"]
                assert "who" in link["services"] and link["hosts_queues"] is True

    asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
