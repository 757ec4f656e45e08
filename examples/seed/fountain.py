"""The seed's fountain (queuecrazy.py), ported to Python 3: a PUSH socket
that binds and sends a random builtin name every 0.4 s.

    python fountain.py [URL] [--count N] [--interval S] [--echo]

Only the options are new: the seed runs forever; --count stops after N
words (and waits for them to leave), --echo prints each word sent.
"""

import argparse
import random
import time

import zmq

zcontext = zmq.Context()


def fountain(url, count=None, interval=0.4, echo=False):
    """Produces a steady stream of words."""
    zsock = zcontext.socket(zmq.PUSH)
    zsock.bind(url)
    words = [w for w in dir(__builtins__) if w.islower()]
    sent = 0
    while count is None or sent < count:
        word = random.choice(words)
        zsock.send(word.encode())  # Python 3: a frame is bytes
        sent += 1
        if echo:
            print("sent", word, flush=True)
        time.sleep(interval)
    zsock.close()  # the default linger lets the last words leave
    zcontext.term()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="tcp://127.0.0.1:6700")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--interval", type=float, default=0.4)
    parser.add_argument("--echo", action="store_true")
    args = parser.parse_args()
    fountain(args.url, args.count, args.interval, args.echo)
