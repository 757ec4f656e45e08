"""CURVE key files in ZeroMQ's certificate format.

``pigeon keys new PATH`` writes ``PATH.key`` (the public key, to hand out)
and ``PATH.key_secret`` (both keys, mode 0600, to keep). A key is 32 bytes,
written as 40 characters of Z85. Like ssh, pigeon refuses a secret key file
that other users can read.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from ..errors import KeyFileError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_KEY_LINE = re.compile(r'^\s+(public|secret)-key\s*=\s*"([^"]*)"\s*$')


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A node's or client's keys, as Z85 text. ``repr`` never shows the secret."""

    public: str
    secret: str

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public!r}, secret=<hidden>)"


def _check_z85(text: str, where: str) -> str:
    try:
        raw = z85.decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError, IndexError) as exc:
        raise KeyFileError(f"{where}: not a Z85 key", path=where) from exc
    if len(text) != 40 or len(raw) != 32:
        raise KeyFileError(f"{where}: a CURVE key is 40 Z85 characters", path=where)
    return text


def is_key_text(value: str) -> bool:
    """True if ``value`` looks like a key itself rather than a file's path."""
    return len(value) == 40 and os.path.sep not in value and not value.endswith(PUBLIC_SUFFIX)


def _read(path: Path) -> dict[str, str]:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file", path=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc})", path=str(path)) from exc
    keys: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        match = _KEY_LINE.match(line)
        if section == "curve" and match:
            keys[match.group(1)] = _check_z85(match.group(2), str(path))
    if "public" not in keys:
        raise KeyFileError(
            f"{path}: not a ZeroMQ certificate (no curve public-key); make keys with "
            "'pigeon keys new PATH'",
            path=str(path),
        )
    return keys


def load_secret(path: str | os.PathLike[str]) -> KeyPair:
    """Read a ``.key_secret`` file.

    Raises:
        KeyFileError: missing, malformed, a public key only, or readable by others.
    """
    path = Path(path)
    keys = _read(path)
    if "secret" not in keys:
        raise KeyFileError(
            f"{path} holds only a public key; give the matching {SECRET_SUFFIX} file",
            path=str(path),
        )
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}",
            path=str(path),
        )
    pair = KeyPair(keys["public"], keys["secret"])
    if zmq.curve_public(pair.secret.encode()).decode() != pair.public:
        raise KeyFileError(
            f"{path}: the public key does not belong to the secret key", path=str(path)
        )
    return pair


def load_public(value: str | os.PathLike[str]) -> str:
    """A public key given as Z85 text or as a ``.key`` (or ``.key_secret``) file.

    Raises:
        KeyFileError: missing or malformed.
    """
    if isinstance(value, str) and is_key_text(value):
        return _check_z85(value, "the key given")
    return _read(Path(value))["public"]


def new_keys(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Make a key pair: ``PATH.key`` (0644) and ``PATH.key_secret`` (0600).

    Raises:
        KeyFileError: either file exists already (keys are never overwritten).
    """
    base = os.fspath(path)
    public_path, secret_path = Path(base + PUBLIC_SUFFIX), Path(base + SECRET_SUFFIX)
    public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    _write(secret_path, _certificate(stamp, "Secret", public, secret), 0o600)
    _write(public_path, _certificate(stamp, "Public", public, None), 0o644)
    return public_path, secret_path


def _certificate(stamp: str, kind: str, public: str, secret: str | None) -> str:
    lines = [
        f"#   ****  Generated on {stamp} by pigeon  ****",
        f"#   ZeroMQ CURVE **{kind}** Certificate",
    ]
    if secret is not None:
        lines.append("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
    lines += ["", "metadata", "curve", f'    public-key = "{public}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise KeyFileError(
            f"{path} exists already; keys are never overwritten", path=str(path)
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc}", path=str(path)) from exc
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)  # the umask may have taken bits off a public key
