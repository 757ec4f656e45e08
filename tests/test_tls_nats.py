"""nats:// and tls:// over TLS, with credentials, against nats-servers the
tests start themselves (tests/tlsutil.py): one with TLS and users (a
password and an nkey), one with mutual TLS and a token. Secrets never show
in errors, repr or stats."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brokers
import pytest
import tlsutil
from tlsutil import PASSWORD, TOKEN, USER

import pigeon
from pigeon.errors import AuthenticationError
from pigeon.message import new_id
from pigeon.testing import conformance

pytest.importorskip("nats")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tlsutil.Certs:
    return tlsutil.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def nkey(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return tlsutil.nkey_pair(tmp_path_factory.mktemp("nkey"))


@pytest.fixture(scope="module")
def users_server(
    tmp_path_factory: pytest.TempPathFactory, certs: tlsutil.Certs, nkey: tuple[str, str]
) -> Iterator[tlsutil.NatsServer]:
    """TLS without client certificates; a user with a password, and an nkey user."""
    auth = f"""authorization {{
  users = [
    {{ user: "{USER}", password: "{PASSWORD}" }}
    {{ nkey: "{nkey[1]}" }}
  ]
}}"""
    server = tlsutil.NatsServer(
        tmp_path_factory.mktemp("nats-users"), certs, verify=False, auth=auth
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: tlsutil.Certs
) -> Iterator[tlsutil.NatsServer]:
    """Mutual TLS (clients need a certificate from the CA) and a token."""
    server = tlsutil.NatsServer(
        tmp_path_factory.mktemp("nats-mtls"),
        certs,
        verify=True,
        auth=f'authorization {{ token: "{TOKEN}" }}',
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def operator_server(
    tmp_path_factory: pytest.TempPathFactory, certs: tlsutil.Certs
) -> Iterator[tuple[tlsutil.NatsServer, str]]:
    """TLS in operator mode (accounts and users are JWTs): a user's .creds file."""
    directory = tmp_path_factory.mktemp("nats-operator")
    config, creds = tlsutil.operator_mode(directory)
    server = tlsutil.NatsServer(directory, certs, verify=False, auth=config)
    server.start()
    yield server, creds
    server.stop()


def _isolated(url: str) -> str:
    tag = new_id()
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}stream=PIGEON_TLS_{tag}&prefix=ptls{tag}"


def _no_secret(*texts: object) -> None:
    for text in texts:
        for secret in (PASSWORD, TOKEN):
            assert secret not in str(text), f"a secret shows in {text!r}"


async def _roundtrip(conn: pigeon.Connection) -> None:
    """Send and consume, then call a service: everything the transport does."""
    got: list[str] = []
    await conn.consume("jobs", lambda d: got.append(d.message.text))
    await conn.send("jobs", "over tls")
    await conformance.wait_until(lambda: got == ["over tls"], what="the message over TLS")

    async def upper(message: pigeon.Message) -> str:
        return message.text.upper()

    await conn.serve("upper", upper)
    reply = await conn.request("upper", "hello", timeout=5)
    assert reply.text == "HELLO"


# -- what works ---------------------------------------------------------------


def test_tls_url_with_password_sends_consumes_and_calls(
    users_server: tlsutil.NatsServer, certs: tlsutil.Certs
) -> None:
    url = _isolated(f"tls://{USER}:{PASSWORD}@127.0.0.1:{users_server.port}?tls_ca={certs.ca}")

    async def main() -> None:
        async with pigeon.connect(url) as conn:
            await _roundtrip(conn)
            assert conn.stats()["connected"] is True
            _no_secret(repr(conn), repr(conn.transport), conn.transport.url, conn.stats())
            _no_secret(repr(conn.transport.options))  # type: ignore[attr-defined]

    asyncio.run(main())


def test_nats_url_with_keyword_options(
    users_server: tlsutil.NatsServer, certs: tlsutil.Certs
) -> None:
    url = _isolated(f"nats://127.0.0.1:{users_server.port}")

    async def main() -> None:
        async with pigeon.connect(url, ca_file=certs.ca, user=USER, password=PASSWORD) as conn:
            await _roundtrip(conn)
            _no_secret(repr(conn.transport), repr(conn.transport.options), conn.stats())  # type: ignore[attr-defined]

    asyncio.run(main())


def test_nkey_seed_file(
    users_server: tlsutil.NatsServer, certs: tlsutil.Certs, nkey: tuple[str, str]
) -> None:
    url = _isolated(f"tls://127.0.0.1:{users_server.port}?nkeys_seed={nkey[0]}")

    async def main() -> None:
        async with pigeon.connect(url, tls_ca=certs.ca) as conn:
            await _roundtrip(conn)

    asyncio.run(main())


def test_creds_file(operator_server: tuple[tlsutil.NatsServer, str], certs: tlsutil.Certs) -> None:
    server, creds = operator_server
    url = _isolated(f"tls://127.0.0.1:{server.port}")

    async def main() -> None:
        async with pigeon.connect(url, ca_file=certs.ca, user_credentials=creds) as conn:
            await _roundtrip(conn)

    asyncio.run(main())


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
def test_conformance_over_tls(
    users_server: tlsutil.NatsServer, certs: tlsutil.Certs, scenario: Any
) -> None:
    url = _isolated(f"tls://{USER}:{PASSWORD}@127.0.0.1:{users_server.port}?tls_ca={certs.ca}")
    conformance.run(scenario, conformance.BrokerSetup(url))


def test_mutual_tls_with_token(mtls_server: tlsutil.NatsServer, certs: tlsutil.Certs) -> None:
    url = _isolated(f"tls://{TOKEN}@127.0.0.1:{mtls_server.port}")

    async def main() -> None:
        async with pigeon.connect(
            url, ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key
        ) as conn:
            await _roundtrip(conn)
            _no_secret(repr(conn.transport), conn.transport.url, conn.stats())

    asyncio.run(main())


# -- what fails, and how ------------------------------------------------------


def test_wrong_ca_is_a_certificate_error_at_once(
    users_server: tlsutil.NatsServer, certs: tlsutil.Certs
) -> None:
    url = f"tls://{USER}:{PASSWORD}@127.0.0.1:{users_server.port}"

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(pigeon.TransportError, match="certificate") as info:
            await pigeon.connect(url, tls_ca=certs.other_ca, connect_timeout=2)
        assert time.monotonic() - started < 5, "a refused certificate must not be retried"
        assert "tls_ca" in str(info.value)  # says what to check
        assert info.value.__cause__ is not None
        _no_secret(info.value, repr(info.value), info.value.address)

    asyncio.run(main())


def test_system_cas_do_not_trust_a_private_ca(users_server: tlsutil.NatsServer) -> None:
    """tls:// without tls_ca verifies against the system's CAs, so a test
    CA's certificate is refused rather than accepted blindly."""

    async def main() -> None:
        with pytest.raises(pigeon.TransportError, match="certificate"):
            await pigeon.connect(
                f"tls://127.0.0.1:{users_server.port}", user=USER, password=PASSWORD
            )

    asyncio.run(main())


def test_host_name_must_match_the_certificate(
    users_server: tlsutil.NatsServer, certs: tlsutil.Certs
) -> None:
    async def main() -> None:
        with pytest.raises(pigeon.TransportError, match="certificate"):
            await pigeon.connect(
                f"tls://127.0.0.1:{users_server.port}",
                tls_ca=certs.ca,
                tls_hostname="broker.example.com",
                user=USER,
                password=PASSWORD,
            )

    asyncio.run(main())


def test_wrong_password_is_an_authentication_error(
    users_server: tlsutil.NatsServer, certs: tlsutil.Certs
) -> None:
    wrong = PASSWORD + "-wrong"

    async def main() -> None:
        with pytest.raises(AuthenticationError, match="refused the credentials") as info:
            await pigeon.connect(
                f"tls://{USER}:{wrong}@127.0.0.1:{users_server.port}", tls_ca=certs.ca
            )
        assert wrong not in str(info.value)
        assert "***" in str(info.value)

    asyncio.run(main())


def test_mutual_tls_without_a_client_certificate_fails_clearly(
    mtls_server: tlsutil.NatsServer, certs: tlsutil.Certs
) -> None:
    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(pigeon.TransportError, match="TLS.*cert_file") as info:
            await pigeon.connect(
                f"tls://127.0.0.1:{mtls_server.port}", tls_ca=certs.ca, token=TOKEN
            )
        assert time.monotonic() - started < 10
        _no_secret(info.value)

    asyncio.run(main())


class _PlainServer:
    """Poses as a NATS server without TLS, and records what it is sent."""

    def __init__(self) -> None:
        self.received = b""
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> _PlainServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "fake", "version": "2.10.0", "max_payload": 1048576, "headers": True}
        try:
            writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
            await writer.drain()
            while data := await asyncio.wait_for(reader.read(4096), 5):
                self.received += data
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def test_tls_is_not_dropped_for_a_server_that_does_not_offer_it(certs: tlsutil.Certs) -> None:
    """nats-py alone would send CONNECT (with the password) in clear to a
    server whose INFO does not ask for TLS, tls:// or not."""

    async def main() -> None:
        async with _PlainServer() as fake:
            for url, options in (
                (f"tls://{USER}:{PASSWORD}@127.0.0.1:{fake.port}", {}),
                (f"nats://127.0.0.1:{fake.port}", {"tls_ca": certs.ca, "token": TOKEN}),
            ):
                started = time.monotonic()
                with pytest.raises(pigeon.TransportError, match="did not offer TLS") as info:
                    await pigeon.connect(url, connect_timeout=1, **options)
                assert time.monotonic() - started < 5
                _no_secret(info.value)
            assert b"CONNECT" not in fake.received
            _no_secret(fake.received)

    asyncio.run(main())


# -- secrets never shown ------------------------------------------------------


def test_secrets_stay_out_of_errors_repr_and_stats() -> None:
    from pigeon.transports.nats import NatsTransport

    async def main() -> None:
        with brokers.Unlistened() as address:
            port = address.rpartition(":")[2]
            for url, options in (
                (f"nats://{USER}:{PASSWORD}@127.0.0.1:{port}", {}),
                (f"nats://{TOKEN}@127.0.0.1:{port}", {}),
                (f"nats://127.0.0.1:{port}?user={USER}&password={PASSWORD}", {}),
                (f"nats://127.0.0.1:{port}", {"token": TOKEN}),
            ):
                transport = NatsTransport(url, connect_timeout=0.5, **options)
                _no_secret(repr(transport), transport.url, transport.stats())
                _no_secret(repr(transport.options), str(transport.options))
                conn = pigeon.connect(url, connect_timeout=0.5, **options)
                with pytest.raises(pigeon.NotStartedError) as not_started:
                    conn.send_nowait("q", "x")
                _no_secret(not_started.value)
                with pytest.raises(pigeon.TransportError) as info:
                    await conn.start()
                _no_secret(info.value, repr(info.value), info.value.__cause__, conn.stats())
                if "@" in url or "password=" in url:
                    assert "***" in str(info.value)  # masked, where the URL had it

    asyncio.run(main())


def test_secrets_stay_out_of_configuration_errors() -> None:
    for url, options in (
        (f"nats://{USER}:{PASSWORD}@127.0.0.1:port", {}),
        (f"nats://{USER}:{PASSWORD}@127.0.0.1:4222?bogus=1", {}),
        (f"nats://{USER}:{PASSWORD}@127.0.0.1:4222", {"token": TOKEN}),
        ("nats://127.0.0.1:4222", {"password": PASSWORD}),
        ("nats://127.0.0.1:4222", {"token": 5}),
        (f"nats://127.0.0.1:4222?token={TOKEN}&send_timeout=x", {}),
    ):
        with pytest.raises(pigeon.ConfigurationError) as info:
            pigeon.connect(url, **options)
        _no_secret(info.value)


def test_tls_options_that_cannot_work(certs: tlsutil.Certs, tmp_path: Path) -> None:
    import ssl

    missing = str(tmp_path / "nope.pem")
    cases: list[tuple[dict[str, object], str]] = [
        ({"tls_ca": missing}, "not a file"),
        ({"ca_file": certs.client_key}, "no usable CA"),
        ({"tls_key": certs.client_key}, "needs tls_cert"),
        ({"tls_cert": certs.client_cert, "tls_key": certs.server_key}, "client certificate"),
        ({"tls": "yes"}, "SSLContext"),
        ({"tls": ssl.create_default_context(), "tls_ca": certs.ca}, "not both"),
        ({"ca_file": certs.ca, "tls_ca": certs.ca}, "same option"),
        ({"user": USER}, "together"),
        ({"nkeys_seed": missing}, "not a file"),
        ({"user_credentials": missing}, "not a file"),
        ({"token": TOKEN, "user": USER, "password": PASSWORD}, "one way to log in"),
    ]
    for options, message in cases:
        with pytest.raises(pigeon.ConfigurationError, match=message):
            pigeon.connect("nats://127.0.0.1:4222", **options)
    with pytest.raises(pigeon.ConfigurationError, match="keyword"):
        pigeon.connect("nats://127.0.0.1:4222?tls=1")
