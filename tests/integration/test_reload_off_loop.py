"""A reload reads keys, certificates and CRLs and builds contexts in a worker thread: the
event loop keeps relaying meanwhile, even for a CRL of 170,000 entries (about 5 MB)."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.helpers import PKI, backend, echo, hostport, server_doc, tls_connect, write_large_crl, write_yaml
from tunnel.config import load_paths
from tunnel.daemon import Daemon, build_states


async def test_a_reload_with_a_large_crl_does_not_stall_open_connections(pki_files: PKI, tmp_path: Path) -> None:
    crl = write_large_crl(pki_files.dir, tmp_path / "large.crl", 170_000)
    assert crl.stat().st_size > 4_500_000
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address)
        doc["tls"]["crl"] = str(crl)
        path = write_yaml(tmp_path / "s.yaml", doc)
        daemon = Daemon([path], build_states(load_paths([path])), watch_interval=0)
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(daemon.run)
            stream = await tls_connect(pki_files, hostport(addresses["s"]), "app1")
            gaps: list[float] = []
            reloaded = trio.Event()

            async def ping() -> None:
                last = trio.current_time()
                while not reloaded.is_set():
                    await stream.send_all(b"x")
                    assert await stream.receive_some(1) == b"x"
                    now = trio.current_time()
                    gaps.append(now - last)
                    last = now

            with trio.fail_after(30):
                async with trio.open_nursery() as pinging:
                    pinging.start_soon(ping)
                    await trio.sleep(0.1)
                    gaps.clear()  # from here on: during the reload
                    assert await daemon.reload()
                    reloaded.set()
            await stream.aclose()
            daemon.stop()
        assert len(gaps) > 10, gaps
        assert max(gaps) < 0.05, f"largest gap between round trips {max(gaps) * 1000:.0f} ms"
