"""The JetStream streams behind topics: retained patterns, and the streams
durable subscriptions of topics nothing retains live on.

Rule 1: ``retain(pattern)`` creates (or updates) the stream
``<stream>_T_<pattern made safe>_<hash>`` on the subject
``<prefix>.r.<pattern>``, where publishers of its topics send them; it
republishes what it stored to ``<prefix>.t.<topic>``, where plain
subscribers listen. So they get a retained topic's messages once each, as
stored and numbered, never a publish the stream refused (storing.py).
Limits retention, limits from the Retention:
``max_count`` is ``max_msgs_per_subject`` (per topic, as the core's Rule 5
keeps it), ``max_bytes`` the stream's ``max_bytes`` (all topics of the
pattern together: JetStream has no per-subject byte limit), ``max_age``
its ``max_age``. It discards old messages unless a ``block`` subscription
made it discard new ones (Rule 5). A pattern overlapping another retained
pattern is refused with ConfigurationError: a topic is kept by one stream.
Rule 2: a durable subscription (a name) on topics no retained pattern
covers gets a subscription stream ``<stream>_S_<pattern made safe>_<hash>``
on ``<prefix>.t.<pattern>`` (so it takes plain publishes and what retained
streams republish alike): interest
retention (a message goes once every durable subscription of it has acked
it), ``max_msgs`` = ``buffer + prefetch`` (``2 * buffer + prefetch`` for
policy ``disconnect``; raised, never lowered, by later subscribers),
discarding old messages (``drop-oldest``) or, once a ``block``
subscription asked, new ones. It keeps no history: a replay of it
is refused like one of topics not retained.
Rule 3: a publisher learns which topics a stream holds from a listing of
the streams on ``<prefix>.r.>`` and ``<prefix>.t.>``: the first publish of a topic waits for a
listing made after it (one listing serves every topic waiting), later ones
use the latest listing, made again in the background at most every
``REFRESH`` seconds while publishing. So a stream made by another process
before a topic's first publish here is always used; one made later, within
``REFRESH`` s of being made (publishes in between go out on core NATS:
a retained stream does not keep them, a subscription stream does).
Rule 4: a subscription that replays needs one retained pattern covering
its own (one covering only part of it is a ConfigurationError saying what
to retain); a durable one uses such a retained stream if there is one,
else a subscription stream.
Rule 5: a ``block`` subscription makes its stream discard new messages at
its limits (per subject for ``max_count``), so a publish there is refused
(Backpressure) instead of trimming what the subscriber has not read. The
stream keeps discarding new messages after that subscription ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from ..._core.topics import Retention, check_pattern, covers, matches
from ...errors import ConfigurationError, PigeonError
from .errors import map_exceptions
from .options import NatsOptions

log = logging.getLogger("pigeon.nats")

REFRESH = 2.0  # seconds between two listings of the topic streams while publishing
API = "$JS.API"
OVERLAP = 10065  # JetStream's "subjects overlap with an existing stream"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_CACHED = 100_000  # topics whose stream is remembered


@dataclass(frozen=True, slots=True)
class TopicStream:
    """A stream holding the topics of one pattern."""

    name: str
    pattern: str  # the pigeon pattern (without the subject prefix)
    root: str  # ``<prefix>.r.`` (retained) or ``<prefix>.t.`` (subscription stream)
    retained: bool

    @property
    def subject(self) -> str:
        """The subject it takes messages on."""
        return self.root + self.pattern

    def subject_of(self, topic: str) -> str:
        """Where a publish on ``topic`` goes to be stored here."""
        return self.root + topic


class TopicStreams:
    """The topic streams of one subject prefix.

    Args:
        nc: the connection JetStream's API is asked on.
        js: its JetStream context.
        options: the transport's options (stream name, prefix, replicas,
            duplicate window, ack timeout).
        counts: the topic counters (``stream_listings``...).
    """

    def __init__(
        self, nc: Client, js: JetStreamContext, options: NatsOptions, counts: Counter[str]
    ) -> None:
        self.nc = nc
        self.js = js
        self.options = options
        self.counts = counts
        self.root = f"{options.prefix}.t."  # topics, where subscribers listen
        self.kept_root = f"{options.prefix}.r."  # retained topics, where they are stored
        self.streams: dict[str, TopicStream] = {}  # by stream name
        self._foreign: set[str] = set()  # streams on those subjects pigeon did not make
        self._learned_at: dict[str, float] = {}  # streams seen or made here, when
        self._by_topic: dict[str, TopicStream | None] = {}
        self._listed_at = -math.inf  # when the latest listing that worked began
        self._listing: asyncio.Task[None] | None = None
        self._listing_began = 0.0

    def subject(self, pattern: str) -> str:
        return self.root + pattern

    def stream_name(self, pattern: str, kind: str) -> str:
        safe = _NAME_UNSAFE.sub("_", pattern)[:120]
        digest = hashlib.sha256(self.subject(pattern).encode()).hexdigest()[:10]
        return f"{self.options.stream[:64]}_{kind}_{safe}_{digest}"

    # -- which stream holds a topic (Rule 3) -----------------------------

    def stream_for(self, topic: str) -> TopicStream | None:
        """The stream holding ``topic`` in the latest listing."""
        try:
            return self._by_topic[topic]
        except KeyError:
            pass
        found = next((s for s in self.streams.values() if matches(s.pattern, topic)), None)
        if len(self._by_topic) >= _MAX_CACHED:
            self._by_topic.clear()
        self._by_topic[topic] = found
        return found

    def _learn(self, stream: TopicStream) -> None:
        self._learned_at[stream.name] = time.monotonic()
        if self.streams.get(stream.name) != stream:
            self.streams[stream.name] = stream
            self._by_topic.clear()

    async def listed_since(self, since: float) -> None:
        """Return once a listing begun at or after ``since`` (monotonic) is done.

        Raises:
            TransportError, Timeout: JetStream did not answer.
        """
        while self._listed_at < since:
            task = self._listing
            if task is None or task.done():
                task = self._begin_listing()
            await asyncio.shield(task)

    def maybe_refresh(self) -> None:
        """List again in the background if the latest listing is older than
        ``REFRESH`` seconds (failures are counted, and tried again later)."""
        if time.monotonic() - self._listed_at < REFRESH:
            return
        if self._listing is None or self._listing.done():
            self._begin_listing()

    async def close(self) -> None:
        """Stop a listing still running."""
        task, self._listing = self._listing, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _begin_listing(self) -> asyncio.Task[None]:
        self._listing_began = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._list(self._listing_began))
        task.add_done_callback(self._listed)
        self._listing = task
        return task

    def _listed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.counts["stream_listing_failures"] += 1
            log.debug("listing the topic streams failed: %s", task.exception())

    async def _list(self, began: float) -> None:
        names = await self._names(self.kept_root + ">") + await self._names(self.root + ">")
        found: dict[str, TopicStream] = {}
        for name in names:
            if name in self._foreign:
                continue
            known = self.streams.get(name) or await self._describe(name)
            if known is not None:
                found[name] = known
        self.counts["stream_listings"] += 1
        for name, stream in self.streams.items():
            # One made or seen here since the listing began stays: a server
            # of a cluster may list it only a moment later.
            if name not in found and self._learned_at.get(name, -math.inf) >= began:
                found[name] = stream
        if found != self.streams:
            self.streams = found
            self._by_topic.clear()
        self._listed_at = max(self._listed_at, began)

    async def _names(self, subject: str) -> list[str]:
        """The streams whose subjects overlap ``subject``."""
        names: list[str] = []
        offset = 0
        while True:
            reply = await self.api(
                "list the topic streams",
                f"{API}.STREAM.NAMES",
                {"subject": subject, "offset": offset},
            )
            page = reply.get("streams") or []
            names.extend(page)
            offset += len(page)
            if not page or offset >= int(reply.get("total", 0)):
                return names

    async def _describe(self, name: str) -> TopicStream | None:
        """The topic stream ``name``, or None if it is gone or not one of ours."""
        try:
            with map_exceptions(f"look at stream {name}", timeout=self.options.ack_timeout):
                info = await self.js.stream_info(name)
        except PigeonError as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return None  # deleted since it was listed
            raise
        stream = self._topic_stream(info)
        if stream is None:
            self._foreign.add(name)
        return stream

    def _topic_stream(self, info: StreamInfo) -> TopicStream | None:
        subjects = info.config.subjects or []
        name = info.config.name or ""
        if len(subjects) == 1:
            for root, retained in ((self.kept_root, True), (self.root, False)):
                if subjects[0].startswith(root):
                    return TopicStream(name, subjects[0][len(root) :], root, retained)
        return None  # not made by pigeon (a plain publish is stored there all the same)

    # -- retain (Rule 1) -------------------------------------------------

    async def retain(self, pattern: str, retention: Retention) -> TopicStream:
        """Create or update the stream of ``pattern``.

        Raises:
            ConfigurationError: a bad pattern or retention, a pattern
                overlapping another stream's subjects, or a limit JetStream
                refuses.
            TransportError, Timeout: JetStream did not answer.
        """
        try:
            check_pattern(pattern)
            retention.check()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from None
        name = self.stream_name(pattern, "T")
        config = StreamConfig(
            name=name,
            subjects=[self.kept_root + pattern],
            republish=RePublish(src=self.kept_root + pattern, dest=self.root + _mapped(pattern)),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=retention.max_count or -1,
            max_bytes=retention.max_bytes or -1,
            max_age=retention.max_age,
            discard=DiscardPolicy.OLD,
            # JetStream refuses a duplicate window longer than max_age.
            duplicate_window=min(self.options.duplicate_window, retention.max_age or math.inf),
            num_replicas=self.options.replicas,
        )

        def keep(existing: StreamConfig) -> None:
            # A block subscription's discard-new stays (Rule 5).
            config.discard = existing.discard
            config.discard_new_per_subject = existing.discard_new_per_subject
            config.num_replicas = existing.num_replicas

        stream = await self._put(f"retain {pattern!r}", config, keep)
        return stream

    async def _put(
        self,
        what: str,
        config: StreamConfig,
        keep: Any,
    ) -> TopicStream:
        """Create the stream of ``config``, or update it (``keep`` copies
        what an update must not change from the existing configuration)."""
        what = f"{what} (stream {config.name})"
        try:
            with map_exceptions(what, timeout=self.options.ack_timeout):
                try:
                    info = await self.js.stream_info(config.name or "")
                except nats.js.errors.NotFoundError:
                    try:
                        info = await self.js.add_stream(config)
                        self.counts["streams_created"] += 1
                    except nats.js.errors.BadRequestError as exc:
                        if exc.err_code == OVERLAP:
                            raise
                        # Made meanwhile by another subscriber: update it below.
                        info = await self.js.stream_info(config.name or "")
                if info.config.subjects != config.subjects:
                    raise ConfigurationError(
                        f"{what}: the stream exists on {info.config.subjects}, not "
                        f"{config.subjects}: delete it, or use another stream= option"
                    )
                if info.config.retention != config.retention:
                    raise ConfigurationError(
                        f"{what}: the stream exists with {info.config.retention} retention, "
                        f"not {config.retention}: delete it, or use another stream= option"
                    )
                keep(info.config)
                if _differs(info.config, config):
                    info = await self.js.update_stream(config)
        except ConfigurationError as exc:
            cause = exc.__cause__
            if isinstance(cause, nats.js.errors.APIError) and cause.err_code == OVERLAP:
                raise ConfigurationError(
                    f"{what}: its subjects overlap another stream's (another retained "
                    f"pattern, durable subscriptions of an overlapping pattern, or a stream "
                    f"not made by pigeon): a topic is kept by one stream"
                ) from cause
            raise
        stream = self._topic_stream(info)
        if stream is None:  # cannot be: the subjects were checked above
            raise ConfigurationError(f"{what}: not a topic stream")
        self._learn(stream)
        return stream

    # -- subscriptions on streams (Rules 2, 4 and 5) ---------------------

    async def for_subscription(
        self,
        pattern: str,
        *,
        why: str,
        history: bool,
        block: bool,
        limit: int,
        durable: str | None = None,
    ) -> TopicStream:
        """The stream a durable or replaying subscription to ``pattern`` consumes.

        Args:
            why: what asks, for error messages.
            history: it replays (needs a retained pattern).
            block: its policy is ``block`` (Rule 5).
            limit: ``buffer + prefetch``, for a subscription stream (Rule 2).
            durable: the durable consumer's name: a stream that has it
                already is its stream (made before a retain(), say).

        Raises:
            ConfigurationError: history of topics not retained, or a pattern
                only partly held by streams.
            TransportError, Timeout: JetStream did not answer.
        """
        overlapping: list[TopicStream] = []
        for root in (self.kept_root, self.root):
            for name in await self._names(root + pattern):
                stream = None if name in self._foreign else await self._describe(name)
                if stream is not None:
                    self._learn(stream)
                    overlapping.append(stream)
        if durable is not None:
            for stream in overlapping:
                if covers(stream.pattern, pattern) and await self._has(stream, durable):
                    if block:
                        if stream.retained:
                            await self.discard_new(stream)
                        else:
                            await self._subscription_stream(stream.pattern, block, limit)
                    return stream
        retained = [s for s in overlapping if s.retained]
        kept = [s for s in retained if covers(s.pattern, pattern)]
        if kept:
            if block:
                await self.discard_new(kept[0])
            return kept[0]
        if history:
            if retained:
                held = ", ".join(repr(s.pattern) for s in retained)
                raise ConfigurationError(
                    f"{why} needs one retained pattern covering {pattern!r}, but only part "
                    f"of its topics are retained (by {held}): subscribe within a retained "
                    f"pattern, or retain() one covering {pattern!r}"
                )
            raise ConfigurationError(
                f"{why} needs history, and topic(s) {pattern!r} are not retained: declare "
                f"them with retain() first"
            )
        # A durable subscription on topics no retained pattern covers.
        others = [s for s in overlapping if not s.retained]
        holding = [s for s in others if covers(s.pattern, pattern)]
        if holding:
            return await self._subscription_stream(holding[0].pattern, block, limit)
        if others:
            names = ", ".join(repr(s.pattern) for s in others)
            raise ConfigurationError(
                f"{why}: durable subscriptions of {names} hold part of the topics of "
                f"{pattern!r}, and a topic is held by one stream: subscribe within that "
                f"pattern, or retain() one covering {pattern!r}"
            )
        return await self._subscription_stream(pattern, block, limit)

    async def _has(self, stream: TopicStream, consumer: str) -> bool:
        """Does ``stream`` have the consumer ``consumer``?"""
        try:
            with map_exceptions(f"look at stream {stream.name}", timeout=self.options.ack_timeout):
                await self.js.consumer_info(stream.name, consumer)
        except PigeonError as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return False
            raise
        return True

    async def _subscription_stream(self, pattern: str, block: bool, limit: int) -> TopicStream:
        config = StreamConfig(
            name=self.stream_name(pattern, "S"),
            subjects=[self.root + pattern],
            retention=RetentionPolicy.INTEREST,
            storage=StorageType.FILE,
            max_msgs=limit,
            discard=DiscardPolicy.NEW if block else DiscardPolicy.OLD,
            duplicate_window=self.options.duplicate_window,
            num_replicas=self.options.replicas,
        )

        def keep(existing: StreamConfig) -> None:
            # Limits only grow, and discard-new stays (Rules 2 and 5).
            config.max_msgs = max(limit, existing.max_msgs or 0)
            if existing.discard == DiscardPolicy.NEW:
                config.discard = DiscardPolicy.NEW
            config.num_replicas = existing.num_replicas

        return await self._put(f"hold {pattern!r} for durable subscriptions", config, keep)

    async def discard_new(self, stream: TopicStream) -> None:
        """Make retained ``stream`` refuse publishes at its limits (Rule 5).

        Raises:
            ConfigurationError, TransportError, Timeout: as for ``retain``.
        """
        what = f"make stream {stream.name} discard new messages"
        with map_exceptions(what, timeout=self.options.ack_timeout):
            config = (await self.js.stream_info(stream.name)).config
            per_subject = (config.max_msgs_per_subject or -1) > 0
            if config.discard == DiscardPolicy.NEW and (
                config.discard_new_per_subject == per_subject
            ):
                return
            config.discard = DiscardPolicy.NEW
            config.discard_new_per_subject = per_subject
            await self.js.update_stream(config)
        self.counts["streams_set_to_discard_new"] += 1
        log.info("stream %s now discards new messages at its limits", stream.name)

    async def api(self, what: str, subject: str, request: dict[str, Any]) -> dict[str, Any]:
        """Ask JetStream's API; its answer as a dict.

        Raises:
            ConfigurationError: JetStream refused it (400).
            TransportError, Timeout: JetStream did not answer or failed.
        """
        timeout = self.options.ack_timeout
        with map_exceptions(what, timeout=timeout):
            msg = await self.nc.request(subject, json.dumps(request).encode(), timeout=timeout)
            reply: dict[str, Any] = json.loads(msg.data or b"{}")
            error = reply.get("error")
            if error:
                nats.js.errors.APIError.from_error(error)  # raises the matching APIError
        return reply


def _mapped(pattern: str) -> str:
    """``pattern`` as a republish destination: each ``*`` names the token it took."""
    tokens = pattern.split(".")
    wildcards = 0
    for i, token in enumerate(tokens):
        if token == "*":
            wildcards += 1
            tokens[i] = f"{{{{wildcard({wildcards})}}}}"
    return ".".join(tokens)


def _differs(have: StreamConfig, want: StreamConfig) -> bool:
    fields = (
        "max_msgs",
        "max_msgs_per_subject",
        "max_bytes",
        "max_age",
        "discard",
        "discard_new_per_subject",
        "duplicate_window",
    )
    return any(getattr(have, f) != getattr(want, f) for f in fields)
