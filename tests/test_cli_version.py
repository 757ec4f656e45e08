"""``pigeon --version`` prints the version and exits 0; install hints name
both the PyPI distribution and a clone's editable install."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import pigeon
from pigeon._extras import install_hint
from pigeon.cli import main as cli


def test_version_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"pigeon {cli.version()}\n"


def test_version_comes_from_the_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def fake_version(name: str) -> str:
        asked.append(name)
        return "9.8.7"

    monkeypatch.setattr(metadata, "version", fake_version)
    assert cli.version() == "9.8.7"
    assert asked == ["pigeon-queues"]


def test_version_falls_back_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli.version() == pigeon.__version__


def test_version_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pigeon.cli.main", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pigeon ") and done.stdout.strip() != "pigeon"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "command" in capsys.readouterr().err


def test_bench_hint_names_pypi_and_a_clone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hint = install_hint("bench")
    assert "pip install 'pigeon-queues[bench]'" in hint
    assert "pip install -e '.[bench]'" in hint
    monkeypatch.setitem(sys.modules, "pigeon.bench", None)  # as if its extras were missing
    assert cli.main(["bench", "queue"]) == 2
    assert hint in capsys.readouterr().err
