"""Place orders with the shop and read its invoices, with plain blocking
calls (``pigeon.sync``): the same verbs as the async API, no event loop.

    python examples/app/client.py [URL]
"""

from __future__ import annotations

import queue
import sys

from shop import Invoice, Order

import pigeon.sync

url = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
invoices: queue.Queue[Invoice] = queue.Queue()


def invoiced(delivery: pigeon.sync.Delivery) -> None:
    invoices.put(delivery.decode(Invoice))  # returning acks it


with pigeon.sync.connect(url) as conn:
    print("a pear costs", conn.request("shop.price", "pear", timeout=10).decode(float))
    for n, item in enumerate(["apple", "pear", "plum"], 1):
        conn.send("shop.orders", Order(f"order-{n}", item, quantity=n))
    conn.consume("shop.invoices", invoiced)
    for _ in range(3):
        invoice = invoices.get(timeout=30)
        print("invoice for", invoice.order, "total", invoice.total)
