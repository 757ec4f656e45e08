"""``pigeon dashboard`` in a real headless Chromium, against a real ``pigeon
node`` with traffic: the numbers the page shows are those of ``pigeon
queues --json``; its replay and purge buttons move the dead letters; a
screenshot of it is taken (and kept in docs/img/ when
``PIGEON_DASHBOARD_SCREENSHOT`` names the file)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cdp import CHROMIUM, Chromium, Page
from dashboards import Dashboard, Process, http, queues_json, start_node, start_traffic

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUEUE_FIELDS = ("ready", "in_flight", "consumers", "dead")  # shown and in --json
READ_QUEUES = """(() => {
  const out = {};
  for (const tr of document.querySelectorAll("#queues tbody tr")) {
    const row = {};
    for (const td of tr.querySelectorAll("td[data-field]")) row[td.dataset.field] = td.textContent;
    out[tr.dataset.queue] = row;
  }
  return out;
})()"""
READ_SERVICES = """(() => {
  const out = {};
  for (const tr of document.querySelectorAll("#services tbody tr")) {
    const row = {};
    for (const td of tr.querySelectorAll("td[data-field]")) row[td.dataset.field] = td.textContent;
    out[tr.dataset.service] = row;
  }
  return out;
})()"""


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    if CHROMIUM is None:
        reason = "chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the dashboard's browser test")
        pytest.skip(reason)
    with Chromium(tmp_path) as browser:
        yield browser


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[str, Process, Process, Dashboard]]:
    """A node with traffic held still, and a dashboard on it."""
    node, url = start_node(tmp_path)
    traffic = dashboard = None
    try:
        traffic = start_traffic(url, tmp_path)
        dashboard = Dashboard(url, tmp_path)
        yield url, node, traffic, dashboard
    finally:
        for process in (dashboard, traffic, node):
            if process is not None:
                process.stop()


def shown_queues(page: Page) -> dict[str, dict[str, str]]:
    queues: dict[str, dict[str, str]] = page.evaluate(READ_QUEUES)
    return queues


def as_shown(value: Any) -> str:
    return "—" if value is None else str(value)


def wait_until_shown(
    page: Page, url: str, what: str, *, moving: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait until the page shows what ``pigeon queues --json`` says, read
    before and after the page (both the same: the traffic holds still, but
    for the ``moving`` queues, left out)."""
    deadline = time.monotonic() + 60
    while True:
        before, shown, after = (
            {name: row for name, row in reading.items() if name not in moving}
            for reading in (queues_json(url), shown_queues(page), queues_json(url))
        )
        expected = {
            name: {field: as_shown(row.get(field)) for field in QUEUE_FIELDS}
            for name, row in after.items()
        }
        got = {
            name: {field: row.get(field) for field in QUEUE_FIELDS} for name, row in shown.items()
        }
        if before == after and got == expected:
            return after, shown
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the page shows {got}\npigeon queues --json: {expected}")
        time.sleep(0.2)


def test_the_page_shows_what_pigeon_queues_says_and_its_buttons_act(
    chromium: Chromium, system: tuple[str, Process, Process, Dashboard], tmp_path: Path
) -> None:
    url, node, traffic, dashboard = system
    page = chromium.page()
    page.call("Page.navigate", url=f"{dashboard.address}#token={dashboard.token}")
    page.wait_for("document.body.dataset.ready === 'yes'", "a first reading")

    # The numbers: the same as pigeon queues --json, taken around the reading.
    queues, shown = wait_until_shown(page, url, "the traffic")
    assert queues["orders"]["ready"] == 7
    assert (queues["emails"]["in_flight"], queues["emails"]["consumers"]) == (4, 1)
    assert (queues["invoices"]["dead"], queues["refunds"]["dead"]) == (3, 2)
    # Rates: still queues have a rate of 0 once two readings are known.
    page.wait_for(
        'document.querySelector(\'tr[data-queue="orders"] [data-field="received_rate"]\')'
        ".textContent === '0.0'",
        "a received rate of 0.0 for a still queue",
    )
    assert page.evaluate("document.querySelectorAll('svg.sparkline').length") >= 2 * len(shown)

    services = page.wait_for(f"{READ_SERVICES}.echo && {READ_SERVICES}", "the echo service")
    echo = services["echo"]
    counted = {field: echo[field] for field in ("servers", "calls", "errors")}
    assert counted == {"servers": "1", "calls": "6", "errors": "1"}, echo
    assert 0 < float(echo["p50_ms"]) <= float(echo["p99_ms"]), echo
    peers = page.evaluate(
        "[...document.querySelectorAll('#peers tbody [data-field=services]')]"
        ".map((td) => td.textContent)"
    )
    assert "echo" in peers

    # The dead letters of a queue, listed by its "show" button.
    page.evaluate("document.querySelector('button[data-action=show][data-queue=invoices]').click()")
    page.wait_for(
        "!document.getElementById('letters').hidden && "
        "document.querySelectorAll('#letters tbody tr').length === 3",
        "the 3 dead letters of invoices",
    )

    # A screenshot with traffic flowing through events, the sparklines
    # moving (the other queues hold still: they are compared again below).
    assert traffic.proc.stdin is not None
    traffic.proc.stdin.write("flow\n")
    traffic.proc.stdin.flush()
    page.wait_for(
        "document.querySelector('tr[data-queue=\"events\"]') !== null && "
        "Number(document.body.dataset.polls) > 0",
        "the events queue",
    )
    polls = int(page.evaluate("Number(document.body.dataset.polls)"))
    page.wait_for(f"Number(document.body.dataset.polls) >= {polls + 20}", "20 more readings")
    shot = Path(os.environ.get("PIGEON_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    page.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Without the token, or from another origin, the action is refused and
    # nothing moves.
    status, answer = http(dashboard.address, "/api/replay", body={"queue": "invoices"})
    assert status == 403, answer
    status, answer = http(
        dashboard.address,
        "/api/purge",
        body={"queue": "refunds"},
        headers={"X-Pigeon-Token": dashboard.token, "Origin": "http://elsewhere.example"},
    )
    assert status == 403, answer
    assert (queues_json(url)["invoices"]["dead"], queues_json(url)["refunds"]["dead"]) == (3, 2)

    # Replay through the page's own button: the letters go back to invoices.
    page.evaluate(
        "document.querySelector('button[data-action=replay][data-queue=invoices]').click()"
    )
    said = page.wait_for(
        "document.getElementById('action').textContent.startsWith('replayed') && "
        "document.getElementById('action').textContent",
        "the replay's answer",
    )
    assert said == "replayed 3 dead letter(s) into invoices"
    # Purge through its button, once the confirmation is answered yes.
    page.evaluate("window.confirm = () => true")
    page.evaluate("document.querySelector('button[data-action=purge][data-queue=refunds]').click()")
    said = page.wait_for(
        "document.getElementById('action').textContent.startsWith('purged') && "
        "document.getElementById('action').textContent",
        "the purge's answer",
    )
    assert said == "purged 2 dead letter(s) of refunds"
    queues, _ = wait_until_shown(page, url, "after replay and purge", moving=("events",))
    assert (queues["invoices"]["ready"], queues["invoices"]["dead"]) == (3, 0)
    assert (queues["refunds"]["ready"], queues["refunds"]["dead"]) == (0, 0)

    # The node goes away: the page says so, over the last numbers it read.
    traffic.stop()
    node.stop()
    said = page.wait_for(
        "!document.getElementById('error').hidden && document.getElementById('error').textContent",
        "that the node is gone",
    )
    assert said.startswith(f"Unreachable: Nothing reachable at {url}"), said
    assert "numbers below are from" in said
    assert shown_queues(page)["orders"]["ready"] == "7"
