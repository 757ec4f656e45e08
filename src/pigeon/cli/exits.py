"""What the ``pigeon`` command exits with, in one place.

0 ok; 1 the operation failed (a node answered, and said no); 2 a usage or
configuration error (click's own code for a usage error); 69 nothing reachable at the
address given (``EX_UNAVAILABLE`` of sysexits.h).
"""

from __future__ import annotations

# The admin layer raises it (pigeon.admin); a command may too.
from ..admin.errors import Unreachable

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "Unreachable"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
