"""What the ``pigeon`` command exits with, in one place.

0 ok; 1 the operation failed (a node answered, and said no); 2 a usage or
configuration error (argparse's own code); 69 nothing reachable at the
address given (``EX_UNAVAILABLE`` of sysexits.h).
"""

from __future__ import annotations

from ..errors import PigeonError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69


class Unreachable(PigeonError):
    """Nothing answered at the address a command was given."""

    def __init__(self, address: str, why: str = "") -> None:
        super().__init__(f"Nothing reachable at {address}" + (f" ({why})" if why else ""))
        self.address = address
