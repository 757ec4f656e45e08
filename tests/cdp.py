"""A small client of Chromium's DevTools protocol for the dashboard's
browser test: start headless Chromium, open a page, evaluate script in it,
take a screenshot. Its WebSocket client is the least RFC 6455 that Chromium
needs (text frames, masked as a client must; ping answered), so the test
needs no package beyond the standard library."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT = 60.0  # bound for what takes a second or two on a quiet machine


class WebSocket:
    """One client WebSocket connection (text messages only)."""

    def __init__(self, url: str, timeout: float = WAIT) -> None:
        match = re.fullmatch(r"ws://([^/:]+):(\d+)(/.*)", url)
        assert match, url
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "DevTools closed the connection during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head.decode(errors="replace")

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "DevTools closed the connection"
            data += chunk
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._exactly(2)
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", self._exactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", self._exactly(8))
            payload = self._exactly(n)
            opcode = first & 0x0F
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise AssertionError("DevTools closed the WebSocket")
            message += payload
            if first & 0x80:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


class Page:
    """One page target of a running Chromium."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self._next = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._next:
                assert "error" not in reply, f"{method}: {reply['error']}"
                result: dict[str, Any] = reply["result"]
                return result

    def evaluate(self, script: str) -> Any:
        """The value of ``script`` (awaited when it is a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, script: str, what: str, timeout: float = WAIT) -> Any:
        """Evaluate ``script`` until it is truthy; its value. (A script that
        throws counts as not yet: the page may be loading.)"""
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({script}); }} catch (e) {{ return null; }} }})()"
        while True:
            value = self.evaluate(guarded)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {what} within {timeout} s")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


class Chromium:
    """Headless Chromium with DevTools on a free port; a context manager."""

    def __init__(self, profile: Path, *, width: int = 1280, height: int = 800) -> None:
        assert CHROMIUM, "chromium is not installed"
        self.width, self.height = width, height
        self.err = profile / "chromium.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile / 'profile'}",
                    f"--window-size={width},{height}",
                    "--remote-debugging-port=0",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self._pages: list[Page] = []
        self.port = self._devtools_port(profile / "profile" / "DevToolsActivePort")

    def _devtools_port(self, written: Path) -> int:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited {self.proc.returncode}\n{self.log()}")
            if written.exists():
                first = written.read_text().split("\n")[0]
                if first.isdigit():
                    return int(first)
            time.sleep(0.1)
        raise AssertionError(f"chromium opened no DevTools port within {WAIT} s\n{self.log()}")

    def log(self) -> str:
        return self.err.read_text(errors="replace")[-4000:]

    def page(self) -> Page:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=WAIT) as r:
            targets = json.load(r)
        page = next(t for t in targets if t["type"] == "page")
        result = Page(WebSocket(page["webSocketDebuggerUrl"]))
        self._pages.append(result)
        result.call("Page.enable")
        result.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return result

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for page in self._pages:
            page.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
