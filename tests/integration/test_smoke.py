from __future__ import annotations

from pathlib import Path

import trio

from tests.helpers import PKI, backend, echo, running_tunnel, server_doc, tls_connect, write_yaml


async def test_smoke(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            stream = await tls_connect(pki_files, address, "app1")
            await stream.send_all(b"ping")
            with trio.fail_after(5):
                assert await stream.receive_some() == b"ping"
            await stream.aclose()
