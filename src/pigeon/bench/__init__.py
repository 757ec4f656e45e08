"""``pigeon bench``: measure pigeon against raw pyzmq, NATS and RabbitMQ.

Run ``pigeon bench --help`` (or ``python benchmarks/run.py --help``).
"""

from pigeon.bench.runner import main

__all__ = ["main"]
