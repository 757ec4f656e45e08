"""Every Python example in the README, docs/durability.md and docs/transports.md runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show Python code"
    for code in blocks:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "the example should print something"


DOCS = [README.parent / "docs" / "durability.md", README.parent / "docs" / "transports.md"]


def test_docs_python_examples_run() -> None:
    for doc in DOCS:
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
        assert blocks, f"{doc.name} should show Python code"
        for code in blocks:
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0, f"{doc.name}: {done.stderr}"
            assert done.stdout.strip(), f"{doc.name}: the example should print something"
