"""Test kits shipped to users: :class:`TestApp` (an app on ``memory://``
under a clock that moves only when told, see ``docs/testing.md``), pytest
fixtures (:mod:`pigeon.testing.pytest_plugin`), the history checker and the
transport conformance suite."""

from .app import DeadLetter, Failure, SyncTestApp, TestApp
from .clock import LoopClock

__all__ = ["DeadLetter", "Failure", "LoopClock", "SyncTestApp", "TestApp"]
