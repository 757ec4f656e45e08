"""The seed's processor (queuecrazy.py), ported to Python 3: PULL a word
from the fountain, have it processed over REQ, print it.

    python processor.py N [FOUNTAIN_URL [RESPONDER_URL ...]]
"""

import sys

import zmq

zcontext = zmq.Context()


def processor(n, fountain_url, responder_urls):
    """Read words as they are produced; get them processed; print them."""
    zpullsock = zcontext.socket(zmq.PULL)
    zpullsock.connect(fountain_url)

    zreqsock = zcontext.socket(zmq.REQ)
    for url in responder_urls:
        zreqsock.connect(url)

    while True:
        word = zpullsock.recv()
        zreqsock.send(word)
        print(n, zreqsock.recv().decode(), flush=True)  # print n, ... in the seed


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    fountain_url = sys.argv[2] if len(sys.argv) > 2 else "tcp://127.0.0.1:6700"
    responder_urls = sys.argv[3:] or ["tcp://127.0.0.1:6701", "tcp://127.0.0.1:6702"]
    processor(n, fountain_url, responder_urls)
