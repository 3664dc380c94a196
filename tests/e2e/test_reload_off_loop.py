"""A reload reads keys, certificates and CRLs and builds contexts in a worker thread, and
decodes CRLs without holding the GIL for long: the event loop keeps relaying meanwhile,
even for a CRL of 170,000 entries (about 5 MB)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from tests.helpers import PKI, free_port, server_doc, write_large_crl, write_yaml
from tests.process import DaemonProcess, EchoTarget, echo_once, tls_client


def test_a_reload_with_a_large_crl_does_not_stall_open_connections(
    pki_files: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    crl = write_large_crl(pki_files.dir, tmp_path / "large.crl", 170_000)
    assert crl.stat().st_size > 4_500_000
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    doc["tls"]["crl"] = str(crl)
    daemon = DaemonProcess(tmp_path, str(write_yaml(tmp_path / "s.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1", timeout=30)
    with tls_client(pki_files, port, "app1") as client:
        assert echo_once(client, b"x") == b"x"
        reloaded = threading.Event()

        def reload() -> None:
            time.sleep(0.2)
            daemon.signal(signal.SIGHUP)
            daemon.wait_for("reloaded tunnels=1", timeout=30)
            reloaded.set()

        threading.Thread(target=reload, daemon=True).start()
        gaps = []
        last = time.monotonic()
        while not reloaded.is_set():
            assert echo_once(client, b"x") == b"x"
            now = time.monotonic()
            gaps.append(now - last)
            last = now
    assert len(gaps) > 20, gaps
    # The daemon's own pause, as a client sees it (round trips otherwise take well under 1 ms).
    assert max(gaps) < 0.05, f"largest gap between round trips {max(gaps) * 1000:.0f} ms"
    assert daemon.stop() == 0
