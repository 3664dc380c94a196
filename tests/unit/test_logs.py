"""Unit tests for tunnel.logs and the `tunnel status` view: text a peer chooses (addresses,
unix socket paths, certificate names) never breaks a log line or reaches a terminal as
control sequences."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator

import pytest

from tunnel import logs
from tunnel.logs import JSONFormatter, TextFormatter, escape
from tunnel.status import render

HOSTILE = "x\n2026-01-01 00:00:00,000 INFO opened forged\r\x1b[31mred\x1b[0m\u2028\x00\\n\u00a0\U0001f600é"


def test_escape_leaves_printable_text_alone() -> None:
    assert escape("cn=app1 peer=10.0.0.7:51234 é ü 漢字") == "cn=app1 peer=10.0.0.7:51234 é ü 漢字"


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("\n", "\\n"),
        ("\r", "\\r"),
        ("\t", "\\t"),
        ("\x1b[31m", "\\x1b[31m"),
        ("\x00", "\\x00"),
        ("\x7f", "\\x7f"),
        ("\x85", "\\x85"),
        ("\u00a0", "\\xa0"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\u202e", "\\u202e"),  # right-to-left override
        ("\udcff", "\\udcff"),  # a lone surrogate (a unix path that was not UTF-8)
        ("\U000e0001", "\\U000e0001"),
        ("\\", "\\\\"),
        ("\\n", "\\\\n"),  # a backslash then n: not to be read as an escaped newline
    ],
)
def test_escape_writes_every_non_printable_character_and_the_backslash_as_an_escape(raw: str, escaped: str) -> None:
    assert escape(raw) == escaped


def test_escaped_text_is_one_printable_line_that_reads_back_as_the_original() -> None:
    escaped = escape(HOSTILE)
    assert escaped.isprintable()
    assert escaped.encode("unicode_escape").decode("ascii").encode().decode("unicode_escape") == escaped
    assert escaped.encode("latin-1", "backslashreplace").decode("unicode_escape") == HOSTILE


def record(message: str, *args: object, exc: bool = False, **fields: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("tunnel", logging.WARNING, __file__, 1, message, args, exc_info)
    made.event = "refused"
    made.fields = fields
    return made


def test_a_text_line_escapes_every_argument() -> None:
    line = TextFormatter().format(record("refused: %s tunnel=%s peer=%s", HOSTILE, "edge", "unix:/tmp/a\nb"))
    assert "\n" not in line
    assert "\x1b" not in line
    assert line.isprintable()
    assert line.endswith(f"WARNING refused: {escape(HOSTILE)} tunnel=edge peer=unix:/tmp/a\\nb")


def test_a_traceback_follows_on_indented_escaped_lines() -> None:
    text = TextFormatter().format(record("error peer=%s", "p\nq", exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("WARNING error peer=p\\nq")
    assert rest[0] == "  Traceback (most recent call last):"
    # The exception's own newline stays a line break, but what follows it is indented
    # like the rest of the traceback: it cannot pass for a record of its own.
    assert rest[-2:] == ["  ValueError: x", "  " + escape(HOSTILE.split("\n", 1)[1])]
    assert all(line.startswith("  ") and line.isprintable() for line in rest)


def test_a_json_line_is_one_line_of_ascii_that_reads_back_as_the_original() -> None:
    line = JSONFormatter().format(
        record("refused: %s peer=%s", "r\n", HOSTILE, exc=True, peer=HOSTILE, identity="cn=\x1b\u2028", reason="r\n")
    )
    assert "\n" not in line
    assert line.isascii()
    assert line.isprintable()
    doc = json.loads(line)
    assert doc["peer"] == HOSTILE
    assert doc["identity"] == "cn=\x1b\u2028"
    assert doc["message"] == f"refused: r\n peer={HOSTILE}"
    assert HOSTILE in doc["error"]


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What logs.setup (called by the test) writes to stderr; the logging and warnings
    state it changes is put back after."""
    tunnel_log, root = logging.getLogger("tunnel"), logging.getLogger()
    saved = (tunnel_log.handlers[:], tunnel_log.level, tunnel_log.propagate, root.handlers[:], warnings.showwarning)
    try:
        yield lambda: capsys.readouterr().err
    finally:
        tunnel_log.handlers[:], tunnel_log.level, tunnel_log.propagate, root.handlers[:] = saved[:4]
        warnings.showwarning = saved[4]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_python_warnings_are_logged_as_one_record_each(stderr: Callable[[], str], log_format: str) -> None:
    logs.setup(log_format)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Attribute's length must be >= 1 and <= 64, but it was 100\nsecond line", UserWarning, 1)
    lines = stderr().splitlines()
    assert len(lines) == 1, lines
    if log_format == "json":
        doc = json.loads(lines[0])
        assert doc["event"] == "warning"
        assert doc["level"] == "warning"
        assert doc["reason"] == "UserWarning: Attribute's length must be >= 1 and <= 64, but it was 100\nsecond line"
    else:
        assert (
            "WARNING UserWarning: Attribute's length must be >= 1 and <= 64, but it was 100\\nsecond line (" in lines[0]
        )


def test_setup_routes_warnings_and_other_libraries_records_through_the_formatter(stderr: Callable[[], str]) -> None:
    logs.setup("json")
    assert warnings.showwarning is logs._log_warning
    logging.getLogger("trio.serve_listeners").error("accept returned EMFILE\nmore")
    (line,) = stderr().splitlines()
    assert json.loads(line)["message"] == "accept returned EMFILE\nmore"


def test_tunnel_status_shows_hostile_peers_identities_and_states_escaped() -> None:
    health = {
        "status": "unavailable\x1b[2J",
        "tunnels": {"edge\x1b]0;owned\x07": "accept failing: Too many open files"},
        "reload": {"failing_since": "2026-01-01T00:00:00+00:00", "reason": "bad\nfile"},
    }
    rows = [
        {
            "tunnel": "edge\x1b]0;owned\x07",
            "peer": "unix:/tmp/a\nb\x1b[31m",
            "identity": "cn=evil\r\x1b[2K\u2028",
            "since": "2026-01-01T00:00:00Z",
            "bytes_in": 1,
            "bytes_out": 2,
        }
    ]
    shown = render(health, rows)
    assert "\x1b" not in shown
    assert "\r" not in shown
    assert "\u2028" not in shown
    lines = shown.split("\n")
    assert lines[0] == "status: unavailable\\x1b[2J"
    assert lines[1] == "reload failing since 2026-01-01T00:00:00+00:00: bad\\nfile"
    assert len(lines) == 8  # status, reload, blank, 2 health rows, blank, 2 connection rows
    assert "unix:/tmp/a\\nb\\x1b[31m" in lines[-1]
    assert "cn=evil\\r\\x1b[2K\\u2028" in lines[-1]
    header, row = lines[-2:]
    assert header.index("IDENTITY") == row.index("cn=evil"), "columns are padded to the escaped width"
