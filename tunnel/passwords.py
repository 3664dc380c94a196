"""Password files: a private key's password kept in a file of its own (never typed)."""

from __future__ import annotations

from pathlib import Path


def read_password_file(path: Path) -> bytes:
    """The password in *path*: the file's bytes less one trailing newline (``\\n`` or
    ``\\r\\n``), so ``echo secret > FILE`` works. ValueError if nothing is left (an empty
    file); OSError if the file cannot be read."""
    data = path.read_bytes()
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ValueError(f"{path} is empty: it must hold the key's password")
    return data
