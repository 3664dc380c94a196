"""A tunnel whose certificates live in a volume the kubelet projects (a Secret that
cert-manager renews): the daemon must take the new certificate when the kubelet swaps its
`..data` symlink, by itself, with no signal (deploy/kubernetes/, docs/deploy.md)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from tests.helpers import PKI, free_port, make_pki, server_doc, write_yaml
from tests.kubelet import project
from tests.process import DaemonProcess, EchoTarget, echo_once, tls_client
from tunnel import pki


def secret_files(p: PKI) -> dict[str, bytes]:
    """The keys of a cert-manager Secret: tls.crt, tls.key and ca.crt."""
    return {
        "tls.crt": p.crt("server").read_bytes(),
        "tls.key": p.key("server").read_bytes(),
        "ca.crt": p.ca.read_bytes(),
    }


def served_serial(p: PKI, port: int) -> int:
    with tls_client(p, port, "app1") as conn:
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def test_a_kubelet_secret_swap_is_picked_up_without_a_signal(
    tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    own = make_pki(tmp_path / "pki")
    certs = tmp_path / "certs"
    certs.mkdir()
    # The volume's root as the kubelet leaves it: a tmpfs root, root-owned, 1777.
    certs.chmod(0o1777 if os.geteuid() == 0 else 0o755)
    first = project(certs, secret_files(own), mode=0o440)
    port = free_port()
    doc = server_doc(own, target.address, listen=f"127.0.0.1:{port}")
    doc["tls"] = {"cert": str(certs / "tls.crt"), "key": str(certs / "tls.key"), "ca": str(certs / "ca.crt")}
    daemon = DaemonProcess(tmp_path, str(write_yaml(tmp_path / "redis.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    before = served_serial(own, port)

    with tls_client(own, port, "app1") as kept:
        assert echo_once(kept, b"before the swap") == b"before the swap"
        pki.issue(own.dir, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"], force=True)
        renewed = x509.load_pem_x509_certificate(own.crt("server").read_bytes()).serial_number
        second = project(certs, secret_files(own), mode=0o440)
        assert not first.exists()
        assert os.readlink(certs / "..data") == second.name
        assert os.readlink(certs / "tls.crt") == "..data/tls.crt"  # the link itself never changed

        daemon.wait_for("a configuration file changed: reloading")
        daemon.wait_for("reloaded tunnels=1")
        assert served_serial(own, port) == renewed != before
        assert echo_once(kept, b"after the swap") == b"after the swap"
    assert "reload failed" not in daemon.log()
    assert daemon.stop() == 0
