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


@pytest.fixture
def setups(tmp_path):
    def make(transport: str) -> conformance.TransportSetup:
        if transport == "tcp-durable":
            return conformance.ZmqSetup("tcp", str(tmp_path), durable=True)
        return SETUPS[transport]()

    return make


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("transport", [*SETUPS, "tcp-durable"])
def test_conformance(transport: str, scenario, setups) -> None:
    conformance.run(scenario, setups(transport))
