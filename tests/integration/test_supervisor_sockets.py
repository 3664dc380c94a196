"""A --workers supervisor's listening sockets: systemd's (socket activation) go to every
worker and on to an upgrade's new process, whether or not a tunnel is on them now."""

from __future__ import annotations

import shutil
from pathlib import Path

import trio

from tests.helpers import PKI, free_port, server_doc, write_yaml
from tunnel.config import Address, load_file
from tunnel.listener import bind_listener
from tunnel.workers import Supervisor


def test_a_supervisor_hands_systemds_socket_to_its_workers_and_on_even_with_no_tunnel_on_it(
    pki_files: PKI, tmp_path: Path
) -> None:
    """A socket systemd passed stays open when a reload removes its tunnel, so that a
    reload bringing the tunnel back serves it again. A supervisor started (or upgraded)
    while no tunnel is on it gave it to no worker and left it out of the next hand-over
    while still naming it kept: a reload bringing the tunnel back then had the workers
    bind the address themselves (EADDRINUSE against systemd's socket), and the next
    upgrade lost systemd's socket. Found in review."""
    configured = load_file(
        write_yaml(tmp_path / "a.yaml", server_doc(pki_files, "127.0.0.1:1", listen=f"127.0.0.1:{free_port()}"))
    )
    kept_address = Address(host="127.0.0.1", port=free_port())
    systemds = bind_listener(kept_address)  # stands for the socket systemd passed (no tunnel now)
    supervisor = Supervisor([tmp_path], [configured], workers=2, passed={kept_address: systemds})

    async def prepare_and_look() -> tuple[set[Address], set[Address], list[bool]]:
        try:
            supervisor._prepare()
            handed = {address for address, _ in supervisor._listening()}
            given = [kept_address in supervisor._sockets[index] for index in range(2)]
            return supervisor._kept(), handed, given
        finally:
            supervisor._close_sockets(lambda address: address != kept_address)
            if supervisor._notify is not None:
                supervisor._notify.close()
            shutil.rmtree(supervisor._dir, ignore_errors=True)

    try:
        kept, handed, given = trio.run(prepare_and_look)
    finally:
        systemds.close()
    assert kept == {kept_address}
    assert kept_address in handed, "named kept, but its socket is not handed over"
    assert all(given), f"workers given systemd's socket: {given}"
