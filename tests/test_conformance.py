"""The conformance suite over every transport available here."""

from __future__ import annotations

import pytest

from pigeon.testing import conformance

SETUPS = {
    "memory": conformance.MemorySetup,
    "inproc": lambda: conformance.ZmqSetup("inproc"),
    "ipc": lambda: conformance.ZmqSetup("ipc"),
    "tcp": lambda: conformance.ZmqSetup("tcp"),
}


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("transport", list(SETUPS))
def test_conformance(transport: str, scenario) -> None:
    conformance.run(scenario, SETUPS[transport]())
