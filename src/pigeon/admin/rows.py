"""Queue rows from what each broker answers: pure functions, so the
mapping (docs/operations.md, "The operating commands") is tested without
a broker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from .._core.ledger import DEAD_SUFFIX, dead_letter_queue
from .base import QueueRow, queue_row


class PullCounts(NamedTuple):
    """What JetStream's consumer info says of a queue's durable consumer."""

    num_pending: int  # not yet delivered
    num_ack_pending: int  # delivered, not acked
    num_waiting: int  # pull requests waiting


def jetstream_rows(
    prefix: str, subjects: Mapping[str, int], consumers: Mapping[str, PullCounts]
) -> dict[str, QueueRow]:
    """Rows of the queues under ``<prefix>.q.``: ``subjects`` are the stream's
    message counts by subject, ``consumers`` the durables by filter subject.
    A queue is listed if it has messages or a consumer."""
    head = f"{prefix}.q."
    counts = {s[len(head) :]: n for s, n in subjects.items() if s.startswith(head)}
    pulls = {s[len(head) :]: c for s, c in consumers.items() if s.startswith(head)}
    rows: dict[str, QueueRow] = {}
    for name in sorted(set(counts) | set(pulls)):
        pull = pulls.get(name)
        rows[name] = queue_row(
            {
                "ready": pull.num_pending if pull else counts.get(name, 0),
                "in_flight": pull.num_ack_pending if pull else 0,
                "consumers": pull.num_waiting if pull else 0,
                "dead": counts.get(dead_letter_queue(name), 0),
                "stored": counts.get(name, 0),  # in the stream, delivered or not
            }
        )
    return rows


def declared_rows(counts: Mapping[str, tuple[int, int] | None]) -> dict[str, QueueRow]:
    """Rows from passive declares: ``counts`` maps a queue name to its
    (message count, consumer count), or None where there is no such queue."""
    rows: dict[str, QueueRow] = {}
    for name, count in sorted(counts.items()):
        if count is None:
            continue  # recorded once, since deleted
        letters = None if name.endswith(DEAD_SUFFIX) else counts.get(dead_letter_queue(name))
        rows[name] = queue_row(
            {"ready": count[0], "consumers": count[1], "dead": letters[0] if letters else 0}
        )
    return rows
