"""Unit tests for tunnel.passwords: a key's password read from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel.passwords import read_password_file


@pytest.mark.parametrize(
    ("content", "password"),
    [
        (b"s3cret", b"s3cret"),
        (b"s3cret\n", b"s3cret"),
        (b"s3cret\r\n", b"s3cret"),
        (b"s3cret\n\n", b"s3cret\n"),  # one newline only: the rest is the password's
        (b" spaced out \n", b" spaced out "),
        (b"\xc3\xa9t\xc3\xa9\n", b"\xc3\xa9t\xc3\xa9"),
    ],
)
def test_the_password_is_the_file_less_one_trailing_newline(tmp_path: Path, content: bytes, password: bytes) -> None:
    path = tmp_path / "key.pass"
    path.write_bytes(content)
    assert read_password_file(path) == password


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n"])
def test_an_empty_password_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key.pass"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path} is empty"):
        read_password_file(path)


def test_a_missing_password_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_password_file(tmp_path / "nope")
