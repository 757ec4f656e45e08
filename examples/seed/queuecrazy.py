"""The seed's whole program in one process, as it was: threads for a
fountain, two responders and three processors, for 30 seconds."""

import threading
import time

from fountain import fountain
from processor import processor
from responder import responder


def start_thread(function, *args):
    thread = threading.Thread(target=function, args=args)
    thread.daemon = True  # so you can easily Control-C the whole program
    thread.start()


start_thread(fountain, "tcp://127.0.0.1:6700")
start_thread(responder, "tcp://127.0.0.1:6701", bytes.upper)
start_thread(responder, "tcp://127.0.0.1:6702", bytes.lower)
for n in range(3):
    start_thread(
        processor, n + 1, "tcp://127.0.0.1:6700", ["tcp://127.0.0.1:6701", "tcp://127.0.0.1:6702"]
    )
time.sleep(30)
