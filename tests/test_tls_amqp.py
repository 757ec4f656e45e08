"""amqps:// against a RabbitMQ node the tests start themselves
(tests/tlsutil.py): a second node with its own name, cookie, data and one
TLS listener that requires client certificates. The shared broker at
127.0.0.1:5672 is not touched. Secrets never show in errors, repr or stats."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brokers
import pytest
import tlsutil
from tlsutil import PASSWORD, USER

import pigeon
from pigeon.errors import AuthenticationError, ConfigurationError, TransportError
from pigeon.testing import conformance

pytest.importorskip("aio_pika")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tlsutil.Certs:
    return tlsutil.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, certs: tlsutil.Certs
) -> Iterator[tlsutil.RabbitNode]:
    node = tlsutil.RabbitNode(tmp_path_factory.mktemp("rabbit"), certs)
    node.start()
    yield node
    node.stop()


def _url(node: tlsutil.RabbitNode, certs: tlsutil.Certs, password: str = PASSWORD) -> str:
    """amqps:// with RabbitMQ's URI query parameters for TLS."""
    return (
        f"amqps://{USER}:{password}@127.0.0.1:{node.port}/?cacertfile={certs.ca}"
        f"&certfile={certs.client_cert}&keyfile={certs.client_key}&verify=verify_peer"
    )


def _no_secret(*texts: object) -> None:
    for text in texts:
        assert PASSWORD not in str(text), f"the password shows in {text!r}"


async def _roundtrip(conn: pigeon.Connection, tag: str) -> None:
    got: list[str] = []
    await conn.consume(f"tls-jobs-{tag}", lambda d: got.append(d.message.text))
    await conn.send(f"tls-jobs-{tag}", "over tls")
    await conformance.wait_until(lambda: got == ["over tls"], what="the message over TLS")

    async def upper(message: pigeon.Message) -> str:
        return message.text.upper()

    await conn.serve(f"tls-upper-{tag}", upper)
    reply = await conn.request(f"tls-upper-{tag}", "hello", timeout=5)
    assert reply.text == "HELLO"


# -- what works ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
def test_conformance_over_tls(
    node: tlsutil.RabbitNode, certs: tlsutil.Certs, scenario: Any
) -> None:
    conformance.run(scenario, conformance.BrokerSetup(_url(node, certs)))


def test_rabbitmq_query_parameters(node: tlsutil.RabbitNode, certs: tlsutil.Certs) -> None:
    # server_name_indication: the certificate is checked against that name
    # rather than the URL's host (the certificate carries both here).
    url = _url(node, certs) + "&server_name_indication=localhost"

    async def main() -> None:
        async with pigeon.connect(url) as conn:
            await _roundtrip(conn, "query")
            assert conn.stats()["connected"] is True
            _no_secret(repr(conn), repr(conn.transport), conn.transport.url, conn.stats())
            _no_secret(repr(conn.transport.options))  # type: ignore[attr-defined]

    asyncio.run(main())


def test_keyword_options(node: tlsutil.RabbitNode, certs: tlsutil.Certs) -> None:
    async def main() -> None:
        async with pigeon.connect(
            f"amqps://127.0.0.1:{node.port}/",
            user=USER,
            password=PASSWORD,
            ca_file=certs.ca,
            cert_file=certs.client_cert,
            key_file=certs.client_key,
        ) as conn:
            await _roundtrip(conn, "keywords")
            _no_secret(repr(conn.transport), conn.stats())

    asyncio.run(main())


def test_aiormq_query_names(node: tlsutil.RabbitNode, certs: tlsutil.Certs) -> None:
    url = (
        f"amqps://{USER}:{PASSWORD}@127.0.0.1:{node.port}/?cafile={certs.ca}"
        f"&certfile={certs.client_cert}&keyfile={certs.client_key}&no_verify_ssl=0"
    )

    async def main() -> None:
        async with pigeon.connect(url) as conn:
            await conn.send("tls-aiormq-names", "x")

    asyncio.run(main())


def test_verify_off_connects_and_warns(
    node: tlsutil.RabbitNode, certs: tlsutil.Certs, caplog: pytest.LogCaptureFixture
) -> None:
    url = (
        f"amqps://{USER}:{PASSWORD}@127.0.0.1:{node.port}/?cacertfile={certs.other_ca}"
        f"&certfile={certs.client_cert}&keyfile={certs.client_key}&verify=verify_none"
    )

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="pigeon.amqp"):
            async with pigeon.connect(url) as conn:
                await conn.send("tls-verify-none", "x")
        assert "not checked" in caplog.text
        _no_secret(caplog.text)

    asyncio.run(main())


# -- what fails, and how ------------------------------------------------------


def test_wrong_ca_is_a_certificate_error_at_once(
    node: tlsutil.RabbitNode, certs: tlsutil.Certs
) -> None:
    url = _url(node, certs).replace(certs.ca, certs.other_ca)

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(TransportError, match="certificate was not accepted") as info:
            await pigeon.connect(url, connect_timeout=5)
        assert time.monotonic() - started < 5, "a refused certificate must not be retried"
        assert "ca_file" in str(info.value)  # says what to check
        assert info.value.__cause__ is not None
        _no_secret(info.value, repr(info.value), info.value.address)

    asyncio.run(main())


def test_host_name_must_match_the_certificate(
    node: tlsutil.RabbitNode, certs: tlsutil.Certs
) -> None:
    async def main() -> None:
        with pytest.raises(TransportError, match="certificate was not accepted"):
            await pigeon.connect(
                _url(node, certs), server_hostname="broker.example.com", connect_timeout=5
            )

    asyncio.run(main())


def test_without_a_client_certificate_fails_clearly(
    node: tlsutil.RabbitNode, certs: tlsutil.Certs
) -> None:
    url = f"amqps://{USER}:{PASSWORD}@127.0.0.1:{node.port}/?cacertfile={certs.ca}"

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(TransportError, match="cert_file") as info:
            await pigeon.connect(url, connect_timeout=5)
        assert time.monotonic() - started < 10
        _no_secret(info.value)

    asyncio.run(main())


def test_wrong_password_is_an_authentication_error(
    node: tlsutil.RabbitNode, certs: tlsutil.Certs
) -> None:
    wrong = PASSWORD + "-wrong"

    async def main() -> None:
        with pytest.raises(AuthenticationError, match="refused the credentials") as info:
            await pigeon.connect(_url(node, certs, password=wrong), connect_timeout=5)
        _no_secret(info.value)
        assert wrong not in str(info.value)

    asyncio.run(main())


def test_amqps_to_a_plain_listener_says_so() -> None:
    """A server that answers in plain AMQP (as RabbitMQ's 5672 does to a
    bad handshake) rather than TLS."""

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"AMQP\x00\x00\x09\x01")
            await writer.drain()
            await reader.read(4096)
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(plain, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(TransportError, match="TLS listener") as info:
                await pigeon.connect(
                    f"amqps://{USER}:{PASSWORD}@127.0.0.1:{port}/", connect_timeout=5
                )
            _no_secret(info.value)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


# -- options ------------------------------------------------------------------


def test_tls_options_that_cannot_work(certs: tlsutil.Certs, tmp_path: Path) -> None:
    import ssl

    missing = str(tmp_path / "nope.pem")
    tls = "amqps://127.0.0.1/"
    cases: list[tuple[str, dict[str, object], str]] = [
        ("amqp://127.0.0.1/", {"ca_file": certs.ca}, "use amqps://"),
        (f"amqp://127.0.0.1/?cacertfile={certs.ca}", {}, "use amqps://"),
        (tls, {"ca_file": missing}, "not a file"),
        (tls, {"ca_file": certs.client_key}, "no usable CA"),
        (tls, {"key_file": certs.client_key}, "needs cert_file"),
        (tls, {"cert_file": certs.client_cert, "key_file": certs.server_key}, "client cert"),
        (tls, {"ssl_context": "yes"}, "SSLContext"),
        (tls, {"ssl_context": ssl.create_default_context(), "ca_file": certs.ca}, "not both"),
        (tls, {"verify": "no"}, "True or False"),
        (f"{tls}?verify=maybe", {}, "verify_peer or verify_none"),
        (f"{tls}?no_verify_ssl=yes", {}, "0 or 1"),
        (f"{tls}?capath=/etc/ssl/certs", {}, "as a file"),
        (tls, {"user": USER}, "password must be"),
        ("amqps://a:b@127.0.0.1/", {"user": USER, "password": PASSWORD}, "once"),
    ]
    for url, options, message in cases:
        with pytest.raises(ConfigurationError, match=message) as info:
            pigeon.connect(url, **options)
        _no_secret(info.value)


def test_secrets_stay_out_of_errors_repr_and_stats() -> None:
    from pigeon.transports.amqp import AmqpTransport

    async def main() -> None:
        with brokers.Unlistened() as address:
            port = address.rpartition(":")[2]
            for url, options in (
                (f"amqp://{USER}:{PASSWORD}@127.0.0.1:{port}/", {}),
                (f"amqps://{USER}:{PASSWORD}@127.0.0.1:{port}/", {}),
                (f"amqp://127.0.0.1:{port}/", {"user": USER, "password": PASSWORD}),
            ):
                transport = AmqpTransport(url, connect_timeout=1, **options)
                _no_secret(repr(transport), transport.url, transport.address, transport.stats())
                _no_secret(repr(transport.options))
                conn = pigeon.connect(url, connect_timeout=1, **options)
                with pytest.raises(pigeon.NotStartedError) as not_started:
                    conn.send_nowait("q", "x")
                _no_secret(not_started.value)
                with pytest.raises(TransportError) as info:
                    await conn.start()
                _no_secret(info.value, repr(info.value), info.value.__cause__, conn.stats())

    asyncio.run(main())


def test_secrets_stay_out_of_configuration_errors() -> None:
    for url, options in (
        (f"amqp://{USER}:{PASSWORD}@127.0.0.1:port/", {}),
        (f"amqp://{USER}:{PASSWORD}@127.0.0.1:99999/", {}),
        (f"amqp://{USER}:{PASSWORD}@127.0.0.1/", {"bogus": 1}),
        ("amqp://127.0.0.1/", {"user": USER, "password": 5}),
        (f"amqp://{USER}:{PASSWORD}@127.0.0.1/?cacertfile=/x", {}),
    ):
        with pytest.raises(ConfigurationError) as info:
            pigeon.connect(url, **options)
        _no_secret(info.value, repr(info.value))
