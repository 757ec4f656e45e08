"""What each address of the dashboard answers: the page and its assets, the
snapshot, a queue's dead letters, and the two actions (replay and purge a
queue's dead letters), which need the token (``guard``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from importlib import resources
from typing import Any

from ..errors import ConfigurationError, Forbidden, PigeonError
from . import guard
from .http import HttpError, Request, json_response, response
from .watcher import Watcher, describe_error

STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
MAX_NAME = 255  # a queue name longer than any the systems accept
MAX_DEAD_SHOWN = 100


def static_assets() -> dict[str, tuple[bytes, str]]:
    """The bundled assets by file name, with their content types. Read once:
    only these names are served, so no path reaches the file system."""
    folder = resources.files("pigeon.dashboard") / "static"
    assets: dict[str, tuple[bytes, str]] = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in STATIC_TYPES:
            assets[item.name] = (item.read_bytes(), STATIC_TYPES[suffix])
    if "index.html" not in assets:
        raise FileNotFoundError("the dashboard's index.html is not in the package")
    return assets


class Routes:
    """Answers one parsed request; counts what it refuses and does."""

    def __init__(self, watcher: Watcher, *, token: str, port: int, loopback: bool) -> None:
        self.watcher = watcher
        self.token = token
        self.port = port
        self.loopback = loopback
        self.assets = static_assets()
        self.refused: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.action_errors = 0
        self.http: Counter[str] = Counter()  # the server's counts

    async def answer(self, request: Request) -> bytes:
        """The whole response to ``request``.

        Raises:
            HttpError: the request is refused (its status says why).
        """
        refusal = guard.check_host(request, port=self.port, loopback=self.loopback)
        if refusal is not None:
            self.refused[refusal.name] += 1
            raise HttpError(421, refusal.value)
        head_only = request.method == "HEAD"
        if request.method == "POST":
            return await self._act(request)
        path = request.path
        if path == "/":
            path = "/static/index.html"
        if path.startswith("/static/") and path[len("/static/") :] in self.assets:
            body, content_type = self.assets[path[len("/static/") :]]
            return response(200, body, content_type, head_only=head_only)
        if path == "/api/snapshot":
            return json_response(200, self.snapshot(), head_only=head_only)
        if path == "/api/dead":
            return await self._dead(request, head_only)
        raise HttpError(404, f"nothing at {path}")

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.watcher.snapshot(),
            "dashboard": {
                "refused": dict(self.refused),
                "actions": dict(self.actions),
                "action_errors": self.action_errors,
                "http": dict(self.http),
            },
        }

    async def _dead(self, request: Request, head_only: bool) -> bytes:
        queue = _queue_name(request.query.get("queue"))
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            raise HttpError(400, "limit must be a number") from None
        if not 1 <= limit <= MAX_DEAD_SHOWN:
            raise HttpError(400, f"limit must be 1 to {MAX_DEAD_SHOWN}")
        status, value = await self._call(lambda admin: admin.dead(queue, limit))
        return json_response(status, value, head_only=head_only)

    async def _act(self, request: Request) -> bytes:
        verbs = {"/api/replay": "replay", "/api/purge": "purge"}
        verb = verbs.get(request.path)
        if verb is None:
            raise HttpError(405 if request.path.startswith("/api/") else 404, "no such action")
        refusal = guard.check_action(request, token=self.token)
        if refusal is not None:
            self.refused[refusal.name] += 1
            raise HttpError(403, refusal.value)
        fields = request.json()
        if not isinstance(fields, dict):
            raise HttpError(400, "the body must be a JSON object")
        queue = _queue_name(fields.get("queue"))
        self.actions[verb] += 1
        # Only dead letters are touched from the page: purging a queue's
        # ready messages is for `pigeon purge`, with its confirmation.
        if verb == "replay":
            status, value = await self._call(lambda admin: admin.replay(queue))
            answer = {"queue": queue, "replayed": value} if status == 200 else value
        else:
            status, value = await self._call(lambda admin: admin.purge(queue, dead=True))
            answer = {"queue": queue, "purged": value} if status == 200 else value
        if status != 200:
            self.action_errors += 1
        else:
            self.watcher.refresh()  # the page shows the result at once
        return json_response(status, answer)

    async def _call(self, call: Any) -> tuple[int, Any]:
        """``call(admin)``'s answer with 200, or the error with the status
        that says whose it is (the system's refusal, unreachable, late)."""
        try:
            admin = await self.watcher.admin()
            async with asyncio.timeout(self.watcher.timeout * 2):
                return 200, await call(admin)
        except Forbidden as exc:
            return 403, {"error": describe_error(exc)}
        except ConfigurationError as exc:
            return 400, {"error": describe_error(exc)}
        except (PigeonError, TimeoutError) as exc:
            status = 504 if isinstance(exc, TimeoutError) else 502
            return status, {"error": describe_error(exc)}


def _queue_name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise HttpError(400, f"queue must be a name of 1 to {MAX_NAME} characters")
    return value
