"""pytest fixtures for testing pigeon apps.

Turned on by a project, not by installing pigeon: add to the top-level
``conftest.py``::

    pytest_plugins = ["pigeon.testing.pytest_plugin"]

(or run ``pytest -p pigeon.testing.pytest_plugin``). It is not registered
through a ``pytest11`` entry point because that would load it, and import
pigeon, in every pytest run of every project installed next to pigeon,
whether it tests a pigeon app or not.

Fixtures:
    pigeon_test_app: starts a :class:`~pigeon.testing.TestApp` for an app in
        its blocking form (for plain ``def`` tests) and closes it when the
        test ends. Async tests use ``async with TestApp(app) as t:`` instead:
        the test clock belongs to the loop the test runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .app import SyncTestApp, TestApp

if TYPE_CHECKING:
    from ..app import App

__all__ = ["pigeon_test_app"]


@pytest.fixture
def pigeon_test_app() -> Iterator[Callable[..., SyncTestApp]]:
    """A factory: ``t = pigeon_test_app(app)`` starts ``app`` under a test
    clock (keyword options as for :class:`~pigeon.testing.TestApp`); every
    one it started is closed at the end of the test."""
    started: list[SyncTestApp] = []

    def start(app: App, **options: Any) -> SyncTestApp:
        test_app = TestApp(app, **options).sync()
        test_app.start()
        started.append(test_app)
        return test_app

    yield start
    for test_app in reversed(started):
        test_app.close()
