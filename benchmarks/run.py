"""Run a pigeon benchmark from a source checkout: same code as ``pigeon bench``.

Example: ``python benchmarks/run.py queue --seconds 5 --json``
"""

import os
import sys

# Allow running from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from pigeon.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
