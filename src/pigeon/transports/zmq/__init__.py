"""The brokerless transport over ZeroMQ: ``inproc://``, ``ipc://``, ``tcp://``."""

from .node import ZmqTransport

__all__ = ["ZmqTransport"]
