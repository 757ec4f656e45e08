"""Run a pigeon benchmark from a source checkout: same code as ``pigeon bench``.

Example: ``python benchmarks/run.py queue --seconds 5 --json``
"""

import os
import sys

# Allow running from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from pigeon._extras import install_hint  # noqa: E402

if __name__ == "__main__":
    try:
        from pigeon.bench import main
    except ImportError as exc:
        print(f"the benchmark needs its extras ({exc}): {install_hint('bench')}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
