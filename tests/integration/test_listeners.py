"""The registry of listening sockets (listener.Listeners): one socket per address, shared
by its borrowers, closed with the last; adopted sockets are never unlinked."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.helpers import free_port
from tunnel.config import Address
from tunnel.listener import Listeners


async def test_borrowers_of_one_address_share_its_socket_until_the_last_gives_it_back() -> None:
    listeners = Listeners()
    address = Address(host="127.0.0.1", port=free_port())
    first = listeners.borrow(address)
    second = listeners.borrow(address)
    assert first is second
    assert listeners.borrowers(address) == 2
    listeners.give_back(address)
    assert first.fileno() != -1  # the other borrower still serves on it
    listeners.give_back(address)
    assert first.fileno() == -1
    assert address not in listeners
    listeners.give_back(address)  # once more: nothing left to do


async def test_a_unix_socket_the_registry_bound_is_unlinked_with_its_last_borrower(tmp_path: Path) -> None:
    listeners = Listeners()
    address = Address(path=str(tmp_path / "t.sock"))
    listeners.borrow(address)
    assert exists(tmp_path / "t.sock")
    listeners.give_back(address)
    assert not exists(tmp_path / "t.sock")


async def test_an_adopted_socket_is_served_and_closed_but_its_path_is_left(tmp_path: Path) -> None:
    """A socket handed to the process (a supervisor's, systemd's) belongs to whoever made
    its file: they may hand it on again."""
    path = tmp_path / "handed.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    listeners = Listeners()
    address = Address(path=str(path))
    listeners.adopt(address, sock)
    assert listeners.borrow(address) is sock  # not bound again
    listeners.give_back(address)
    assert sock.fileno() == -1
    assert exists(path)


async def test_a_failed_bind_leaves_the_registry_as_it_was() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = Address(host="127.0.0.1", port=taken.getsockname()[1])
        listeners = Listeners()
        with pytest.raises(OSError, match="Address already in use"):
            listeners.borrow(address)
        assert address not in listeners


def exists(path: object) -> bool:
    return os.path.exists(str(path))
