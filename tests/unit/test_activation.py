"""Reading LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES as sd_listen_fds(3) does (the
descriptors themselves: tests/e2e/test_socket_activation.py)."""

from __future__ import annotations

import pytest

from tunnel.activation import ActivationError, listen_fds


def test_no_listen_pid_means_no_sockets_and_the_variables_are_removed() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert listen_fds(env, pid=42) == []
    assert env == {"PATH": "/bin"}


def test_variables_meant_for_another_process_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": "41", "LISTEN_FDS": "not even a number", "LISTEN_FDNAMES": "a"}
    assert listen_fds(env, pid=42) == []
    assert env == {}


def test_no_descriptors_for_us_is_nothing() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "0"}
    assert listen_fds(env, pid=42) == []
    assert env == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "x42", "LISTEN_FDS": "1"}, "LISTEN_PID='x42': expected a process id"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1': expected a number of descriptors"),
        ({"LISTEN_PID": "42"}, "LISTEN_FDS=None: expected a number of descriptors"),
        (
            {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "redis"},
            "LISTEN_FDNAMES='redis' names 1 descriptors, LISTEN_FDS passes 2",
        ),
    ],
)
def test_malformed_variables_are_an_error_naming_them(env: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError, match="^" + message.replace("(", r"\(")):
        listen_fds(env, pid=42)
    assert not any(name.startswith("LISTEN_") for name in env)
