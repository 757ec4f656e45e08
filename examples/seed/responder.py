"""The seed's responder (queuecrazy.py), ported to Python 3: a REP socket
that binds and answers each word with the word changed by ``function``.

    python responder.py [URL] [upper|lower]
"""

import sys

import zmq

zcontext = zmq.Context()
FUNCTIONS = {"upper": bytes.upper, "lower": bytes.lower}  # str.upper in the seed


def responder(url, function):
    """Performs a string operation on each word received."""
    zsock = zcontext.socket(zmq.REP)
    zsock.bind(url)
    while True:
        word = zsock.recv()
        zsock.send(function(word))  # send the modified word back


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:6701"
    name = sys.argv[2] if len(sys.argv) > 2 else "upper"
    responder(url, FUNCTIONS[name])
