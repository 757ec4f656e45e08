"""docs/protocol-vectors.json against pigeon's own encoder and decoder: each
vector's hex decodes to its fields, and its fields encode to its hex, so a
peer in another language that passes the vectors speaks what pigeon speaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pigeon._core import frames
from pigeon.message import Message

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "docs" / "protocol-vectors.json").read_text())
sys.path.insert(0, str(ROOT / "scripts"))
from protocol_vectors import fields  # noqa: E402

_CLASSES: dict[str, type[msgspec.Struct]] = {
    cls.__name__: cls
    for cls in (
        frames.Hello,
        frames.Send,
        frames.Confirm,
        frames.Refuse,
        frames.Consume,
        frames.Cancel,
        frames.Deliver,
        frames.Settle,
        frames.Request,
        frames.Reply,
        frames.Error,
        frames.Batch,
        frames.Verdict,
        frames.Subscribe,
    )
}


def _wire(value: Any) -> Any:
    """JSON fields back to msgpack values: {"bin": hex} to bytes, an
    envelope's fields by name to its array."""
    if isinstance(value, dict) and set(value) == {"bin"}:
        return bytes.fromhex(value["bin"])
    if isinstance(value, dict) and set(value) >= set(Message.__struct_fields__):
        return [_wire(value[name]) for name in Message.__struct_fields__]
    if isinstance(value, dict):
        return {key: _wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_wire(item) for item in value]
    return value


def _frame(vector: dict[str, Any]) -> frames.Frame:
    cls = _CLASSES[vector["frame"]]
    named = vector["fields"]
    items = [named["tag"], *(_wire(named[name]) for name in cls.__struct_fields__)]
    frame: frames.Frame = msgspec.convert(items, frames.Frame)  # type: ignore[arg-type]
    return frame


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_fields_encode_to_the_hex(vector: dict[str, Any]) -> None:
    assert frames.encode(_frame(vector)).hex() == vector["hex"]


@pytest.mark.parametrize(
    "vector", VECTORS["vectors"] + VECTORS["decode_only"], ids=lambda v: v["name"]
)
def test_the_hex_decodes_to_the_fields(vector: dict[str, Any]) -> None:
    frame = frames.decode(bytes.fromhex(vector["hex"]))
    assert type(frame).__name__ == vector["frame"]
    assert fields(frame) == vector["fields"]


def test_every_frame_type_has_a_vector() -> None:
    assert {v["frame"] for v in VECTORS["vectors"]} == set(_CLASSES)


def test_the_file_is_what_the_script_writes(tmp_path: Path) -> None:
    out = tmp_path / "vectors.json"
    script = ROOT / "scripts" / "protocol_vectors.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True)
    assert out.read_text() == (ROOT / "docs" / "protocol-vectors.json").read_text()
