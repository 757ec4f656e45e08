"""The names of pigeon's own message headers, in one place.

Every header pigeon writes starts with ``x-pigeon-``; user headers must not.
Adapters import these names; none spells one out.
"""

from __future__ import annotations

PREFIX = "x-pigeon-"

# Written by a queue host (or a broker adapter standing in for one).
LAST_ERROR = "x-pigeon-last-error"  # the reason of the latest nack
DEAD_QUEUE = "x-pigeon-dead-queue"  # the queue a dead letter first died in
DEAD_REASON = "x-pigeon-dead-reason"  # why it was dead-lettered
ATTEMPTS = "x-pigeon-attempts"  # deliveries it had when it died
DEAD_PREFIX = "x-pigeon-dead-"

# The envelope fields a broker cannot carry natively (AMQP headers).
ATTEMPT = "x-pigeon-attempt"  # deliveries this message had before this copy
REDELIVERED = "x-pigeon-redelivered"  # "1": this copy may have been seen before
CREATED_AT = "x-pigeon-created-at"  # float seconds since the epoch
DEADLINE = "x-pigeon-deadline"  # float seconds since the epoch
ERROR = "x-pigeon-error"  # on a reply: the server's handler failed with this
# Not to be delivered before this wall-clock time (float seconds since the
# epoch); see ``pigeon._core.delay``.
NOT_BEFORE = "x-pigeon-not-before"

# Publish-subscribe (see ``pigeon._core.topics``): set on every published
# message by whoever numbers it (the topic's host, or the publisher).
TOPIC = "x-pigeon-topic"  # the topic it was published on
SEQ = "x-pigeon-seq"  # its number in that topic, from SOURCE (decimal, from 1)
SOURCE = "x-pigeon-source"  # who numbered it: a host's or publisher's session id
# Set by a topic host that counts what its subscriptions drop: the messages
# of this subscription dropped (or refused) right before this one. With it,
# a subscriber counts gaps from it, not from jumps in SEQ.
MISSED = "x-pigeon-missed"

# Scatter-gather (``request_all``): a request with this header is answered
# by every server the receiving node serves or relays, in one reply whose
# body is a msgpack list of reply envelopes (``rpc.REPLIES_TYPE``).
SCATTER = "x-pigeon-scatter"
