"""``pigeon dashboard`` as a user runs it, without a browser: its command
line (start before the node, usage errors, a port in use), the node's
refusals shown rather than hidden, the HTTP bounds and the token; and its
assets found in the installed package."""

from __future__ import annotations

import asyncio
import fnmatch
import re
import socket
import subprocess
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
from brokers import AMQP_URL, NATS_URL, Unlistened, completed, free_port, port_taken, require
from dashboards import PIGEON, WAIT, Dashboard, Process, http, queues_json, start_node

import pigeon
from pigeon.admin import open_admin
from pigeon.dashboard.http import Limits
from pigeon.dashboard.routes import Routes, static_assets
from pigeon.dashboard.server import DashboardServer
from pigeon.dashboard.watcher import Watcher
from pigeon.security.keys import new_keys

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(180)


def snapshot_when(address: str, check: Any, what: str) -> dict[str, Any]:
    """The dashboard's snapshot, once ``check(snapshot)`` holds."""
    deadline = time.monotonic() + WAIT
    while True:
        status, snapshot = http(address, "/api/snapshot")
        assert status == 200, snapshot
        if check(snapshot):
            return dict(snapshot)
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}: {snapshot['error']}")
        time.sleep(0.2)


def raw(port: int, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` as it is; the status and the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = re.match(rb"HTTP/1\.1 (\d+) ", answer)
    assert status, answer[:200]
    return int(status.group(1)), answer


# -- the assets ---------------------------------------------------------------


def test_the_assets_are_in_the_package_and_load_nothing_from_elsewhere() -> None:
    assets = static_assets()  # through importlib.resources, as installed
    assert {"index.html", "dashboard.js", "dashboard.css"} <= set(assets)
    # A wheel carries them: package-data lists every file of static/.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["pigeon"]
    for name in assets:
        assert any(fnmatch.fnmatch(f"dashboard/static/{name}", p) for p in patterns), name
    html = assets["index.html"][0].decode()
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(link.startswith("/static/") for link in links), links
    css = assets["dashboard.css"][0].decode()
    assert "url(" not in css and "@import" not in css
    js = assets["dashboard.js"][0].decode()
    # The one absolute URL is SVG's namespace name, never fetched.
    assert re.findall(r"https?://[^\s\"'`]+", js) == ["http://www.w3.org/2000/svg"]
    assert ".innerHTML" not in js  # names from peers are set as text


# -- the command line -----------------------------------------------------------


def test_a_dashboard_started_before_its_node_says_so_then_shows_it(tmp_path: Path) -> None:
    for _ in range(5):
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        dashboard = Dashboard(url, tmp_path, "--timeout", "1")
        try:
            assert "Nothing reachable at" in dashboard.banner, dashboard.describe()
            snapshot = snapshot_when(dashboard.address, lambda s: s["error"], "an error")
            assert snapshot["error"]["kind"] == "Unreachable"
            assert snapshot["error"]["message"].startswith(f"Nothing reachable at {url}")
            assert snapshot["updated"] is None and snapshot["queues"] == {}
            try:
                node, _ = start_node(tmp_path, bind=url)
            except AssertionError as exc:
                if port_taken(exc):
                    continue  # someone took the port: again, on another
                raise
            try:
                snapshot = snapshot_when(
                    dashboard.address, lambda s: s["error"] is None, "the node once it started"
                )
                assert snapshot["info"]["transport"] == "zmq"
                assert snapshot["watcher"]["poll_errors"] >= 1
            finally:
                node.stop()
            snapshot_when(dashboard.address, lambda s: s["error"], "the node gone")
        finally:
            out = dashboard.stop()
        assert dashboard.proc.returncode == 0, dashboard.describe()
        assert out.strip().endswith("pigeon dashboard: stopped")
        return
    pytest.fail("no free port stayed free")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["foo://somewhere"], "foo://"),
        (["tcp://127.0.0.1:1", "--token", "short"], "at least 16 characters"),
        (["tcp://127.0.0.1:1", "--port", "70000"], "70000"),
    ],
)
def test_a_url_or_option_it_can_never_use_is_a_usage_error(args: list[str], said: str) -> None:
    port = [] if "--port" in args else ["--port", "0"]
    done = subprocess.run(
        [*PIGEON, "dashboard", *args, *port], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 2, completed(done)
    assert said in done.stderr, completed(done)


def test_a_port_in_use_fails_naming_it() -> None:
    with socket.socket() as taken, Unlistened() as url:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*PIGEON, "dashboard", url, "--port", str(port), "--timeout", "0.5"],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    assert done.returncode == 1, completed(done)
    assert f"cannot serve on 127.0.0.1:{port}" in done.stderr, completed(done)


def test_the_nodes_refusal_shows_on_the_page_and_its_admin_sees_everything(
    tmp_path: Path,
) -> None:
    for name in ("node", "viewer", "operator"):
        new_keys(tmp_path / name)
    acl = tmp_path / "acl.toml"
    acl.write_text(
        '[clients.viewer]\nkey = "viewer.key"\ncall = ["echo"]\n\n'
        '[clients.operator]\nkey = "operator.key"\nadmin = true\ncall = ["pigeon.*"]\n'
    )
    node = Process(
        "pigeon node",
        [*PIGEON, "node", "--bind", "tcp://127.0.0.1:0", "--key"]
        + [str(tmp_path / "node.key_secret"), "--allow", str(acl)],
        tmp_path,
    )
    try:
        served = re.search(r"serving (tcp://\S+?);", node.banner)
        assert served, node.describe()
        keys = ["--server-key", str(tmp_path / "node.key")]
        boards = [
            Dashboard(
                served.group(1), tmp_path, "--key", str(tmp_path / f"{who}.key_secret"), *keys
            )
            for who in ("viewer", "operator")
        ]
        try:
            viewer, operator = boards
            refused = snapshot_when(viewer.address, lambda s: s["error"], "the refusal")
            assert refused["error"]["kind"] == "Forbidden", refused["error"]
            assert refused["error"]["message"].startswith("not allowed to "), refused["error"]
            status, answer = http(
                viewer.address,
                "/api/replay",
                body={"queue": "jobs"},
                headers={"X-Pigeon-Token": viewer.token},
            )
            assert status == 403 and answer["error"]["kind"] == "Forbidden", answer
            shown = snapshot_when(operator.address, lambda s: s["updated"], "a reading")
            assert shown["error"] is None and shown["info"]["secure"] is True
        finally:
            for board in boards:
                board.stop()
    finally:
        node.stop()


# -- HTTP: bounds, guards, counts -------------------------------------------------


@pytest.fixture
def board(tmp_path: Path) -> Any:
    with Unlistened() as url:
        dashboard = Dashboard(url, tmp_path, "--timeout", "0.5", "--token", "t" * 20)
        yield dashboard
        dashboard.stop()


def test_http_bounds_and_guards_each_refuse_with_a_status_and_are_counted(board: Dashboard) -> None:
    # A token given is not printed: the banner says where it serves, no more.
    assert "#token=" not in board.banner and "t" * 20 not in board.banner
    port = int(board.address.rsplit(":", 1)[1].strip("/"))
    host = f"Host: 127.0.0.1:{port}\r\n"
    token = "X-Pigeon-Token: " + "t" * 20 + "\r\n"
    json_type = "Content-Type: application/json\r\n"
    cases = [
        (f"GET /api/snapshot HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n", 421),
        (f"GET /nothing HTTP/1.1\r\n{host}\r\n", 404),
        (f"GET /static/../../etc/passwd HTTP/1.1\r\n{host}\r\n", 404),
        (f"PUT / HTTP/1.1\r\n{host}\r\n", 405),
        (f"GET / HTTP/1.1\r\n{host}" + "X-A: 1\r\n" * 60 + "\r\n", 431),
        (f"GET / HTTP/1.1\r\n{host}X: {'a' * 20000}\r\n\r\n", 431),
        (f"POST /api/replay HTTP/1.1\r\n{host}{token}{json_type}\r\n", 411),
        (f"POST /api/replay HTTP/1.1\r\n{host}{token}Content-Length: 5000\r\n\r\n", 413),
        (f"POST /api/replay HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n", 501),
        (f"POST /api/replay HTTP/1.1\r\n{host}{json_type}Content-Length: 2\r\n\r\n{{}}", 403),
        (
            f"POST /api/purge HTTP/1.1\r\n{host}{token}{json_type}"
            "Sec-Fetch-Site: cross-site\r\nContent-Length: 2\r\n\r\n{}",
            403,
        ),
        (f"POST /api/purge HTTP/1.1\r\n{host}{token}Content-Length: 2\r\n\r\n{{}}", 415),
        (f"POST /api/purge HTTP/1.1\r\n{host}{token}{json_type}Content-Length: 2\r\n\r\n{{}}", 400),
        (f"POST /api/purge HTTP/1.1\r\n{host}{token}{json_type}Content-Length: 2\r\n\r\n[]", 400),
    ]
    for request, status in cases:
        got, answer = raw(port, request.encode())
        assert got == status, (request[:120], answer[:300])
    # An action that passes every guard reaches the system, which is not there.
    status, answer = http(
        board.address, "/api/replay", body={"queue": "jobs"}, headers={"X-Pigeon-Token": "t" * 20}
    )
    assert status == 502 and answer["error"]["kind"] == "Unreachable", answer
    # The page and its assets, HEAD included.
    got, answer = raw(port, f"GET / HTTP/1.1\r\n{host}\r\n".encode())
    assert got == 200 and b"<title>pigeon dashboard</title>" in answer
    got, answer = raw(port, f"HEAD /static/dashboard.js HTTP/1.1\r\n{host}\r\n".encode())
    assert got == 200 and answer.endswith(b"\r\n\r\n")
    counts = http(board.address, "/api/snapshot")[1]["dashboard"]
    assert counts["refused"] == {"FOREIGN_HOST": 1, "NO_TOKEN": 1, "CROSS_ORIGIN": 1}
    assert counts["http"]["http_431"] == 2 and counts["http"]["http_413"] == 1
    assert counts["actions"] == {"replay": 1} and counts["action_errors"] == 1


def test_a_slow_client_is_cut_off_and_too_many_at_once_are_turned_away() -> None:
    async def main() -> None:
        with Unlistened() as url:

            async def admin() -> Any:
                return await open_admin(url, timeout=0.5)

            watcher = Watcher(admin, url=url, timeout=0.5)
            routes = Routes(watcher, token="t" * 20, port=0, loopback=True)
            server = DashboardServer(
                routes, limits=Limits(), request_timeout=1.0, max_connections=2
            )
            port = await server.start("127.0.0.1", 0)
            routes.port = port
            try:
                # Two clients that never finish their request hold both slots...
                slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
                for _, writer in slow:
                    writer.write(b"GET / HTTP/1.1\r\n")
                    await writer.drain()
                await asyncio.sleep(0.2)  # let the server take them (not a timing check)
                # ...so a third is turned away at once,
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                assert (await asyncio.wait_for(reader.read(), WAIT)).startswith(b"HTTP/1.1 503 ")
                writer.close()
                # and the slow ones are answered 408 and closed, not waited on.
                for reader, writer in slow:
                    answer = await asyncio.wait_for(reader.read(), WAIT)
                    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
                    writer.close()
                assert routes.http["busy"] == 1 and routes.http["http_408"] == 2
            finally:
                await server.close()

    asyncio.run(main())


# -- every transport pigeon.admin opens -----------------------------------------


def test_on_memory_the_dashboard_shows_its_own_empty_broker(tmp_path: Path) -> None:
    dashboard = Dashboard("memory://", tmp_path)
    try:
        snapshot = snapshot_when(dashboard.address, lambda s: s["updated"], "a reading")
        assert snapshot["error"] is None and snapshot["queues"] == {}
        assert snapshot["info"]["transport"] == "memory"
    finally:
        dashboard.stop()


@pytest.mark.broker
@pytest.mark.parametrize("broker", ["nats", "amqp"])
def test_on_a_broker_the_numbers_are_those_of_pigeon_queues(broker: str, tmp_path: Path) -> None:
    url = require(NATS_URL if broker == "nats" else AMQP_URL)
    queue = f"dashboard-{uuid.uuid4().hex[:10]}"

    async def send() -> None:
        async with pigeon.connect(url) as conn:
            for n in range(3):
                await conn.send(queue, {"n": n})

    asyncio.run(send())
    dashboard = Dashboard(url, tmp_path)
    try:
        expected = queues_json(url)[queue]
        snapshot = snapshot_when(
            dashboard.address, lambda s: queue in s["queues"], f"{queue} on the page"
        )
        shown = snapshot["queues"][queue]
        fields = ("ready", "in_flight", "consumers", "dead")
        assert {f: shown[f] for f in fields} == {f: expected[f] for f in fields}
        assert shown["ready"] == 3
    finally:
        dashboard.stop()
        subprocess.run(
            [*PIGEON, "purge", url, queue, "--yes"], capture_output=True, timeout=WAIT, check=False
        )
