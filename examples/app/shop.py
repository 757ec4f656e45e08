"""A small shop, run with ``pigeon run``: orders arrive on a queue, prices
come from a service, every order taken is published for whoever listens,
and the price list goes out once a minute.

    pigeon node --bind tcp://127.0.0.1:5555 &
    pigeon run examples/app/shop.py --workers 2
    python examples/app/client.py
"""

from __future__ import annotations

import msgspec

import pigeon

app = pigeon.App("tcp://127.0.0.1:5555")

PRICES = {"apple": 0.5, "pear": 0.75, "plum": 0.4}


class Order(msgspec.Struct):
    id: str
    item: str
    quantity: int


class Invoice(msgspec.Struct):
    order: str
    total: float


@app.service("shop.price")
def price(item: str) -> float:
    return PRICES[item]  # an unknown item: the caller gets Rejected


@app.worker("shop.orders", retry=pigeon.RetryPolicy(max_attempts=3))
async def take(order: Order) -> None:
    assert app.connection is not None  # set while the app runs
    invoice = Invoice(order.id, round(PRICES[order.item] * order.quantity, 2))
    await app.connection.send("shop.invoices", invoice)
    await app.connection.publish(f"shop.taken.{order.item}", invoice)


@app.subscriber("shop.taken.*", name="ledger")  # one copy of each, across processes
def record(invoice: Invoice) -> None:
    print(f"taken {invoice.order}: {invoice.total:.2f}", flush=True)


@app.every(60)  # once a minute across every process (and machine) running the shop
async def publish_prices() -> None:
    assert app.connection is not None
    await app.connection.publish("shop.prices", PRICES)
