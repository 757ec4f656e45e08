"""Who may read the dashboard and who may act through it, without I/O.

Rules:
1. On a loopback address, a request must name a loopback host (``Host:
   127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT``). A web page
   elsewhere that points its own name at 127.0.0.1 (DNS rebinding) sends
   its own name, and is refused before it reads anything.
2. An action (replay, purge) is a POST that carries the dashboard's token in
   ``X-Pigeon-Token``. The token is compared in constant time.
3. An action's ``Origin``, when the browser sends one, is this dashboard's
   own; a ``Sec-Fetch-Site`` other than ``same-origin`` or ``none`` is
   refused too. (A page elsewhere cannot set the token header without a
   CORS preflight, which is never answered; these checks make the refusal
   explicit rather than left to the browser.)
"""

from __future__ import annotations

import enum
import hmac
import ipaddress

from .http import Request

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
TOKEN_HEADER = "x-pigeon-token"


class Refusal(enum.Enum):
    """Why a request was refused; counted per member in the stats."""

    FOREIGN_HOST = "the Host header names another site"
    NO_TOKEN = "the request carries no token"
    BAD_TOKEN = "the token is wrong"
    CROSS_ORIGIN = "the request comes from another origin"


def is_loopback(host: str) -> bool:
    """Whether the address ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(request: Request, *, port: int, loopback: bool) -> Refusal | None:
    """Rule 1: None when the request may be answered."""
    if not loopback:
        return None
    host = request.header("host") or ""
    name, _, given_port = host.rpartition(":")
    if name in LOOPBACK_NAMES and given_port == str(port):
        return None
    return Refusal.FOREIGN_HOST


def check_action(request: Request, *, token: str) -> Refusal | None:
    """Rules 2 and 3: None when the request may act."""
    origin = request.header("origin")
    host = request.header("host") or ""
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        return Refusal.CROSS_ORIGIN
    if (request.header("sec-fetch-site") or "same-origin") not in ("same-origin", "none"):
        return Refusal.CROSS_ORIGIN
    given = request.header(TOKEN_HEADER)
    if not given:
        return Refusal.NO_TOKEN
    if not hmac.compare_digest(given.encode(), token.encode()):
        return Refusal.BAD_TOKEN
    return None
