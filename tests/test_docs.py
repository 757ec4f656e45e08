"""Every Python example in the README and in docs/durability.md, transports.md,
security.md, discovery.md, pubsub.md and observability.md runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from brokers import completed

README = Path(__file__).parent.parent / "README.md"


# Each example takes well under a second when the machine is quiet.
EXAMPLE_TIMEOUT = 60


@pytest.mark.timeout(300)
def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show Python code"
    for n, code in enumerate(blocks, 1):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT
        )
        report = completed(done, f"README example {n}")
        assert done.returncode == 0, report
        assert done.stdout.strip(), f"the example should print something\n{report}"


DOCS = [
    README.parent / "docs" / "durability.md",
    README.parent / "docs" / "transports.md",
    README.parent / "docs" / "security.md",
    README.parent / "docs" / "discovery.md",
    README.parent / "docs" / "pubsub.md",
    README.parent / "docs" / "observability.md",
]


@pytest.mark.timeout(300)
def test_docs_python_examples_run() -> None:
    for doc in DOCS:
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
        assert blocks, f"{doc.name} should show Python code"
        for n, code in enumerate(blocks, 1):
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=EXAMPLE_TIMEOUT,
            )
            report = completed(done, f"{doc.name} example {n}")
            assert done.returncode == 0, report
            assert done.stdout.strip(), f"the example should print something\n{report}"
