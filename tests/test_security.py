"""Keys, permissions and deny-by-default on the brokerless transport, over
real sockets: CURVE handshakes, a ZAP handler, an ACL per key."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

import pigeon
from pigeon._core import frames
from pigeon.security.keys import load_public, load_secret, new_keys
from pigeon.transports.zmq import ZmqTransport

pytestmark = pytest.mark.timeout(60)


class Keys:
    """A node key and three client keys, with an ACL granting them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for name in ("node", "fountain", "worker", "thief", "admin", "stranger"):
            new_keys(root / name)
        self.acl = root / "acl.toml"
        self.write_acl(worker_consume=["words", "jobs.>"])

    def write_acl(self, *, worker_consume: list[str]) -> None:
        self.acl.write_text(
            f"""
[clients.fountain]
key = "fountain.key"
send = ["words"]

[clients.worker]
key = "worker.key"
send = ["jobs.*"]
consume = {worker_consume!r}
call = ["case"]

[clients.thief]
key = "thief.key"
consume = ["words"]

[clients.admin]
key = "admin.key"
admin = true
call = ["pigeon.*"]
""".replace("'", '"')
        )

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / f"{name}.key")

    def node(self, **options: object) -> pigeon.Connection:
        return pigeon.connect(
            bind="tcp://127.0.0.1:0", key=self.secret("node"), allow=str(self.acl), **options
        )

    def client(self, url: str, name: str, **options: object) -> pigeon.Connection:
        return pigeon.connect(url, key=self.secret(name), server_key=self.public("node"), **options)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def _url(node: pigeon.Connection) -> str:
    return str(node.stats()["bound"][0])


# -- key files ------------------------------------------------------------


def test_new_keys_are_zeromq_certificates_with_a_private_secret(tmp_path: Path) -> None:
    public, secret = new_keys(tmp_path / "n")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert public.name == "n.key" and secret.name == "n.key_secret"
    assert "secret-key" not in public.read_text()
    pair = load_secret(secret)
    assert load_public(public) == pair.public
    assert pair.secret not in repr(pair)
    # pyzmq reads them too: the format is ZeroMQ's own.
    import zmq.auth

    assert zmq.auth.load_certificate(secret) == (pair.public.encode(), pair.secret.encode())
    with pytest.raises(pigeon.KeyFileError, match="never overwritten"):
        new_keys(tmp_path / "n")


def test_bad_key_files_are_typed_errors(tmp_path: Path) -> None:
    public, secret = new_keys(tmp_path / "n")
    with pytest.raises(pigeon.KeyFileError, match="only a public key"):
        load_secret(public)
    os.chmod(secret, 0o644)
    with pytest.raises(pigeon.KeyFileError, match="chmod 600"):
        load_secret(secret)
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text('curve\n    public-key = "not a key"\n')
    os.chmod(garbage, 0o600)
    with pytest.raises(pigeon.KeyFileError, match="Z85|40"):
        load_secret(garbage)
    empty = tmp_path / "empty.key"
    empty.write_text("hello\n")
    with pytest.raises(pigeon.KeyFileError, match="not a ZeroMQ certificate"):
        load_public(empty)
    with pytest.raises(pigeon.KeyFileError, match="no such key file"):
        load_public(tmp_path / "missing.key")


def test_a_public_key_given_as_the_secret_refuses_to_start(keys: Keys) -> None:
    with pytest.raises(pigeon.KeyFileError, match="only a public key"):
        pigeon.connect(bind="tcp://127.0.0.1:0", key=keys.public("node"), allow=str(keys.acl))


# -- ACL files --------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "line", "match"),
    [
        ('key = "fountain.key"\nsned = ["words"]\n', 3, "unknown field 'sned'"),
        ('key = "fountain.key"\nsend = ["wo*ds"]\n', 3, "whole segments"),
        ('key = "fountain.key"\nsend = ["a.>.b"]\n', 3, "must come last"),
        ('key = "missing.key"\n', 2, "no such key file"),
        ('send = ["words"]\n', 1, "needs key"),
        ('key = "fountain.key"\nadmin = "yes"\n', 3, "true or false"),
    ],
)
def test_a_bad_acl_is_refused_at_start_naming_the_line(
    keys: Keys, table: str, line: int, match: str
) -> None:
    keys.acl.write_text("[clients.fountain]\n" + table)
    with pytest.raises(pigeon.AclError, match=match) as caught:
        keys.node()
    assert caught.value.line == line
    assert f"acl.toml:{line}:" in str(caught.value)


# -- deny by default --------------------------------------------------------


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:0", "tcp://*:5555", "tcp://192.0.2.7:5555"])
def test_a_reachable_bind_without_keys_is_refused(address: str) -> None:
    with pytest.raises(pigeon.ConfigurationError, match="pigeon keys new"):
        pigeon.connect(bind=address)
    # Said out loud, it is allowed (made, not started: nothing is bound).
    ZmqTransport([], [address], insecure=True)


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1:0", "tcp://localhost:0", "tcp://[::1]:0", "inproc://x"]
)
def test_loopback_without_keys_stays_open(address: str) -> None:
    ZmqTransport([], [address])


def test_half_the_keys_is_a_configuration_error(keys: Keys) -> None:
    with pytest.raises(pigeon.ConfigurationError, match="both key= .* and allow="):
        pigeon.connect(bind="tcp://127.0.0.1:0", key=keys.secret("node"))
    with pytest.raises(pigeon.ConfigurationError, match="server_key="):
        pigeon.connect("tcp://127.0.0.1:9", key=keys.secret("worker"))


# -- handshakes -------------------------------------------------------------


def test_an_unknown_key_gets_authentication_error_at_once(keys: Keys) -> None:
    async def scenario() -> None:
        async with keys.node() as node:
            url = _url(node)
            started = time.monotonic()
            with pytest.raises(pigeon.AuthenticationError, match="refused this node's key") as e:
                await keys.client(url, "stranger").start()
            assert e.value.address == url
            assert time.monotonic() - started <= 2.0
            assert node.stats()["auth_failures"] >= 1
            # No keys at all: told that the node requires them.
            with pytest.raises(pigeon.AuthenticationError, match="requires keys"):
                async with pigeon.connect(url) as plain:
                    await plain.send("words", "hi", timeout=5)

    asyncio.run(scenario())


def test_a_wrong_server_key_is_an_authentication_error(keys: Keys) -> None:
    async def scenario() -> None:
        async with keys.node() as node:
            conn = pigeon.connect(
                _url(node), key=keys.secret("worker"), server_key=keys.public("stranger")
            )
            with pytest.raises(pigeon.AuthenticationError, match="server_key"):
                await conn.start()

    asyncio.run(scenario())


def test_keys_from_the_environment(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with keys.node() as node:
            monkeypatch.setenv("PIGEON_KEY", keys.secret("fountain"))
            monkeypatch.setenv("PIGEON_SERVER_KEY", keys.public("node"))
            async with pigeon.connect(_url(node)) as fountain:
                await fountain.send("words", "from the environment", timeout=5)
            assert node.stats()["queues"]["words"]["ready"] == 1

    asyncio.run(scenario())


# -- permissions ------------------------------------------------------------


def test_granted_keys_work_and_grants_are_enforced(keys: Keys) -> None:
    async def scenario() -> None:
        async with keys.node() as node:
            url = _url(node)
            await node.serve("case", lambda m: m.text.upper())
            got: list[str] = []
            async with (
                keys.client(url, "fountain") as fountain,
                keys.client(url, "worker") as worker,
            ):
                await worker.consume("words", lambda d: got.append(d.message.text))
                await fountain.send("words", "hello", timeout=5)
                assert (await worker.request("case", "hi", timeout=5)).text == "HI"
                for _ in range(200):
                    if got:
                        break
                    await asyncio.sleep(0.01)
                assert got == ["hello"]

                # The fountain may only send to "words".
                with pytest.raises(pigeon.Forbidden, match="send 'orders'"):
                    await fountain.send("orders", "x", timeout=5)
                with pytest.raises(pigeon.Forbidden, match="consume 'words'"):
                    await fountain.consume("words", lambda d: None)
                with pytest.raises(pigeon.Forbidden, match="call 'case'"):
                    await fountain.request("case", "x", timeout=5)
                for service, body in [
                    ("pigeon.info", b""),
                    ("pigeon.dead", {"queue": "words"}),
                    ("pigeon.replay", {"queue": "words"}),
                ]:
                    with pytest.raises(pigeon.Forbidden):
                        await fountain.request(service, body, timeout=5)
                assert node.stats()["forbidden"] >= 6

            async with keys.client(url, "admin") as admin:
                info = (await admin.request("pigeon.info", b"", timeout=5)).decode()
                assert info["secure"] is True

    asyncio.run(scenario())


def test_a_removed_grant_gives_leases_back_on_reload(keys: Keys) -> None:
    async def scenario() -> None:
        async with keys.node() as node:
            url = _url(node)
            held: list[pigeon.Delivery] = []
            async with keys.client(url, "worker") as worker:

                async def hold(delivery: pigeon.Delivery) -> None:
                    held.append(delivery)
                    await asyncio.Event().wait()  # never settles by itself

                await worker.consume("words", hold, prefetch=5, concurrency=5)
                async with keys.client(url, "fountain") as fountain:
                    for n in range(10):
                        await fountain.send("words", f"w{n}", timeout=5)
                for _ in range(300):
                    if len(held) == 5:
                        break
                    await asyncio.sleep(0.01)
                assert node.stats()["queues"]["words"]["in_flight"] == 5

                keys.write_acl(worker_consume=[])
                assert node.reload_acl() == 1
                queue = node.stats()["queues"]["words"]
                assert queue["in_flight"] == 0 and queue["ready"] == 10  # nothing lost
                for _ in range(300):
                    if worker.stats()["forbidden"] >= 1:
                        break
                    await asyncio.sleep(0.01)
                assert worker.stats()["forbidden"] >= 1

            # A malformed file keeps the old ACL in force.
            keys.acl.write_text("[clients.x]\nbogus = 1\n")
            with pytest.raises(pigeon.AclError):
                node.reload_acl()

    asyncio.run(scenario())


def test_an_identity_takeover_gets_nothing_the_victim_holds(keys: Keys) -> None:
    async def scenario() -> None:
        async with keys.node() as node:
            url = _url(node)
            held: list[str] = []
            release = asyncio.Event()
            async with keys.client(url, "worker") as victim:

                async def hold(delivery: pigeon.Delivery) -> None:
                    held.append(delivery.message.id)
                    await release.wait()  # then returns: acked

                await victim.consume("words", hold, prefetch=3, concurrency=3)
                async with keys.client(url, "fountain") as fountain:
                    for n in range(6):
                        await fountain.send("words", f"w{n}", timeout=5)
                for _ in range(300):
                    if len(held) == 3:
                        break
                    await asyncio.sleep(0.01)
                victim_id = victim.transport.config.node_id  # type: ignore[attr-defined]

                # The attacker holds a valid key of its own, granted to
                # consume the same queue, and claims the victim's routing id.
                attacker_keys = load_secret(keys.secret("thief"))
                ctx = zmq.asyncio.Context()
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.routing_id = victim_id.encode()
                sock.curve_serverkey = load_public(keys.public("node")).encode()
                sock.curve_publickey = attacker_keys.public.encode()
                sock.curve_secretkey = attacker_keys.secret.encode()
                sock.connect(url)
                for frame in (
                    frames.Hello("attacker", "s"),
                    frames.Consume("words", 100),
                    frames.Settle("words", acks=list(held)),
                ):
                    await sock.send(frames.encode(frame))
                got: list[str] = []
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    if await sock.poll(100):
                        for f in frames.decode_all(await sock.recv()):
                            if isinstance(f, frames.Deliver):
                                got += [m.id for m in f.messages]
                sock.close()
                ctx.term()
                assert got == []
                # The victim's leases are untouched by the attacker's acks,
                # and the victim still holds them.
                queue = node.stats()["queues"]["words"]
                assert queue["acked"] == 0 and queue["in_flight"] == 3 and queue["ready"] == 3
                # Released, the victim acks what it held and gets the rest:
                # its pipe was never handed to the attacker.
                release.set()
                for _ in range(500):
                    if node.stats()["queues"]["words"]["acked"] == 6:
                        break
                    await asyncio.sleep(0.01)
                assert len(held) == 6 and node.stats()["queues"]["words"]["acked"] == 6

    asyncio.run(scenario())


# -- on the wire ------------------------------------------------------------


async def _relay(target_port: int, captured: bytearray) -> tuple[asyncio.AbstractServer, int]:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                captured.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("secure", [True, False])
def test_bodies_on_the_wire_are_encrypted(keys: Keys, secure: bool) -> None:
    secret_body = "PLAINTEXT-BODY-8d1f"

    async def scenario() -> bytes:
        captured = bytearray()
        node = keys.node() if secure else pigeon.connect(bind="tcp://127.0.0.1:0")
        async with node:
            port = int(_url(node).rpartition(":")[2])
            relay, relay_port = await _relay(port, captured)
            url = f"tcp://127.0.0.1:{relay_port}"
            client = keys.client(url, "fountain") if secure else pigeon.connect(url)
            async with client:
                for _ in range(20):
                    await client.send("words", secret_body, timeout=5)
            relay.close()
        return bytes(captured)

    wire = asyncio.run(scenario())
    assert len(wire) > 500  # the relay saw the traffic
    if secure:
        assert secret_body.encode() not in wire
        assert msgspec.msgpack.encode(secret_body) not in wire
    else:  # the check itself works: without keys the body is in clear
        assert secret_body.encode() in wire


def test_a_client_that_drops_mid_handshake_harms_nobody(keys: Keys) -> None:
    async def scenario() -> None:
        async with keys.node() as node:
            url = _url(node)
            port = int(url.rpartition(":")[2])
            for cut in (0, 10, 64):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                # ZMTP greeting with the CURVE mechanism, cut short.
                greeting = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00CURVE" + b"\x00" * 48
                writer.write(greeting[:cut])
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            async with keys.client(url, "fountain") as fountain:
                await fountain.send("words", "still served", timeout=5)
            assert node.stats()["queues"]["words"]["ready"] == 1

    asyncio.run(scenario())


def test_pigeon_node_reloads_its_acl_on_sighup(keys: Keys) -> None:
    import signal
    import subprocess
    import sys

    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pigeon.cli.main",
            "node",
            "--bind",
            "tcp://127.0.0.1:0",
            "--key",
            keys.secret("node"),
            "--allow",
            str(keys.acl),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert node.stdout is not None
        banner = node.stdout.readline()
        assert "keys on" in banner, banner + (node.stderr.read() if node.poll() else "")
        keys.acl.write_text("[clients.x]\nbogus = 1\n")
        node.send_signal(signal.SIGHUP)
        assert "ACL not reloaded" in node.stdout.readline()
        keys.write_acl(worker_consume=[])
        node.send_signal(signal.SIGHUP)
        assert "ACL reloaded" in node.stdout.readline()
    finally:
        node.terminate()
        node.communicate(timeout=30)  # reads and closes both pipes
