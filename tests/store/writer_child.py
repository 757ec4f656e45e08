"""Run as a separate process by the crash test: write batches until killed.

Usage: python writer_child.py DB_PATH SEED [MIN_FREE_DISK]

Prints ``ready`` once the store is open, then, after each ``apply`` has
returned, the ids of that batch on one line. Batch sizes come from
``random.Random(SEED)`` alone, so the parent can recompute the boundaries.
"""

import os
import random
import sys

from pigeon.message import Message
from pigeon.store import Put, SqliteStore


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    floor = {"min_free_disk": int(sys.argv[3])} if len(sys.argv) > 3 else {}
    sizes = random.Random(seed)
    with SqliteStore(path, **floor) as store:
        print("ready", flush=True)
        n = 0
        while True:
            size = sizes.randint(1, 50)
            batch = [f"{n + i:08d}" for i in range(size)]
            store.apply([Put("q", Message(id=i, body=os.urandom(100))) for i in batch])
            n += size
            sys.stdout.write(" ".join(batch) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
