"""pigeon: message queues for Python.

Work queues, request-reply and publish-subscribe with acks, retries,
dead letters, leases, heartbeats and failover; brokerless over ZeroMQ by
default, the same API on NATS and RabbitMQ.
"""

from ._core.backoff import RetryPolicy
from ._core.ledger import dead_letter_queue
from .app import App
from .connection import Connection, connect
from .errors import (
    AclError,
    AuthenticationError,
    Backpressure,
    ClosedError,
    ConfigurationError,
    DecodeError,
    DeliveryError,
    Forbidden,
    KeyFileError,
    LocalProtocolError,
    MessageTooLarge,
    NoPigeonNode,
    NoResponders,
    NotStartedError,
    PigeonError,
    ProtocolError,
    Rejected,
    RemoteProtocolError,
    ReplayTrimmed,
    StoreError,
    SubscriberDisconnected,
    Timeout,
    TransportError,
)
from .message import BYTES, JSON, MSGPACK, TEXT, Message
from .middleware import Middleware, Outcome, RequestOutcome
from .subscriber import Event, EventStream, Subscriber
from .transports import Delivery
from .worker import Server, Worker

__version__ = "0.1.0"

__all__ = [
    "AclError",
    "App",
    "AuthenticationError",
    "BYTES",
    "Backpressure",
    "ClosedError",
    "ConfigurationError",
    "Connection",
    "DecodeError",
    "Delivery",
    "DeliveryError",
    "Event",
    "EventStream",
    "Forbidden",
    "JSON",
    "KeyFileError",
    "LocalProtocolError",
    "MSGPACK",
    "Message",
    "MessageTooLarge",
    "Middleware",
    "NoPigeonNode",
    "NoResponders",
    "NotStartedError",
    "Outcome",
    "PigeonError",
    "ProtocolError",
    "Rejected",
    "RemoteProtocolError",
    "ReplayTrimmed",
    "RequestOutcome",
    "RetryPolicy",
    "Server",
    "StoreError",
    "Subscriber",
    "SubscriberDisconnected",
    "TEXT",
    "Timeout",
    "TransportError",
    "Worker",
    "connect",
    "dead_letter_queue",
]
