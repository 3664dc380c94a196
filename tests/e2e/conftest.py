"""Fixtures for tests that run the real `tunnel` command."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.process import DaemonProcess, EchoTarget


@pytest.fixture
def target() -> Iterator[EchoTarget]:
    """A threaded echo server on 127.0.0.1 that counts what it accepted."""
    echo = EchoTarget()
    yield echo
    echo.close()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Append every DaemonProcess a test starts; whatever is still running is killed after."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.close()
