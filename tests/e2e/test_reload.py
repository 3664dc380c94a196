"""Certificate lifecycle and live reload, against a real `tunnel run` process."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.helpers import PKI, free_port, issue_dated, make_pki, server_doc, write_yaml
from tests.process import TUNNEL, DaemonProcess, EchoTarget, echo_once, is_closed, tls_client, write_atomically
from tunnel import pki


@pytest.fixture
def own_pki(tmp_path: Path) -> PKI:
    """A CA of this test's own: these tests revoke and re-issue."""
    return make_pki(tmp_path / "pki")


def server_file(p: PKI, tmp: Path, target: EchoTarget, port: int, **changes: Any) -> Path:
    doc = server_doc(p, target.address, listen=f"127.0.0.1:{port}")
    doc["tls"]["crl"] = str(p.dir / "crl.pem")
    doc["allow"] = {"cn": ["app1", "app2"]}
    doc["limits"]["drain_timeout"] = "3s"
    doc.update(changes)
    return write_yaml(tmp / "server.yaml", doc)


def start(tmp: Path, cleanup: list[DaemonProcess], *paths: Path, tunnels: int = 1) -> DaemonProcess:
    daemon = DaemonProcess(tmp, *(str(p) for p in paths))
    cleanup.append(daemon)
    daemon.wait_for(f"ready tunnels={tunnels}")
    return daemon


def test_revoke_and_sighup_cuts_the_revoked_client_and_keeps_the_others(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    daemon = start(tmp_path, daemons, server_file(own_pki, tmp_path, target, port))
    with tls_client(own_pki, port, "app1") as keeper, tls_client(own_pki, port, "app2") as doomed:
        assert echo_once(keeper, b"one") == b"one"
        assert echo_once(doomed, b"two") == b"two"
        pki.revoke(own_pki.dir, "app2")
        log = daemon.reload()
        assert "reloaded tunnels=1" in log
        daemon.wait_for("closing tunnel=server")
        assert is_closed(doomed), "revocation must cut the open connection"
        assert echo_once(keeper, b"still here") == b"still here"
    # a new connection with the revoked certificate is refused, with the reason
    with pytest.raises((ssl.SSLError, OSError)), tls_client(own_pki, port, "app2") as again:
        echo_once(again, b"x")
    log = daemon.wait_for("refused: revoked")
    assert "closed on reload: revoked" in log
    assert daemon.stop() == 0


def test_allow_list_edit_takes_effect_on_sighup(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    path = server_file(own_pki, tmp_path, target, port)
    daemon = start(tmp_path, daemons, path)
    with tls_client(own_pki, port, "app1") as keeper, tls_client(own_pki, port, "app2") as dropped:
        assert echo_once(dropped, b"hi") == b"hi"
        server_file(own_pki, tmp_path, target, port, allow={"cn": ["app1"]})
        daemon.reload()
        daemon.wait_for("no longer allowed")
        assert is_closed(dropped)
        assert echo_once(keeper, b"ok") == b"ok"
        with tls_client(own_pki, port, "app2") as refused:
            assert is_closed(refused)
    daemon.wait_for("refused: not allowed")
    assert daemon.stop() == 0


@pytest.mark.parametrize("breakage", ["yaml", "certificate", "crl-from-elsewhere"])
def test_a_broken_reload_keeps_the_old_state_serving(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess], breakage: str
) -> None:
    port = free_port()
    path = server_file(own_pki, tmp_path, target, port)
    daemon = start(tmp_path, daemons, path)
    with tls_client(own_pki, port, "app1") as open_conn:
        assert echo_once(open_conn, b"before") == b"before"
        if breakage == "yaml":
            path.write_text("mode: server\nlisten: [oops\n")
        elif breakage == "certificate":
            own_pki.crt("server").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        else:
            (own_pki.dir / "crl.pem").write_bytes((own_pki.other / "crl.pem").read_bytes())
        log = daemon.reload()
        assert "reload failed, still serving the previous configuration" in log
        assert echo_once(open_conn, b"after") == b"after"
        with tls_client(own_pki, port, "app1") as new_conn:
            assert echo_once(new_conn, b"new") == b"new"
    assert daemon.stop() == 0


def test_a_reissued_server_certificate_is_what_new_clients_see(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    daemon = start(tmp_path, daemons, server_file(own_pki, tmp_path, target, port))

    def served_serial() -> int:
        with tls_client(own_pki, port, "app1") as conn:
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    pki.issue(own_pki.dir, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"], force=True)
    new_serial = x509.load_pem_x509_certificate(own_pki.crt("server").read_bytes()).serial_number
    daemon.reload()
    assert served_serial() == new_serial != before
    assert daemon.stop() == 0


def test_a_changed_file_is_reloaded_without_a_signal(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    path = server_file(own_pki, tmp_path, target, port)
    daemon = start(tmp_path, daemons, path)
    doc = yaml.safe_load(path.read_text())
    doc["allow"] = {"cn": ["app1"]}
    write_atomically(path, yaml.safe_dump(doc))
    daemon.wait_for("a configuration file changed: reloading")
    daemon.wait_for("reloaded tunnels=1")
    with tls_client(own_pki, port, "app2") as refused:
        assert is_closed(refused)
    # revoking rewrites crl.pem: noticed too
    pki.revoke(own_pki.dir, "app1")
    daemon.wait_for("reloaded tunnels=1", count=2)
    with tls_client(own_pki, port, "app1") as revoked:
        assert is_closed(revoked)
    daemon.wait_for("refused: revoked")
    assert daemon.stop() == 0


def test_a_half_written_file_is_never_loaded(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    path = server_file(own_pki, tmp_path, target, port)
    daemon = start(tmp_path, daemons, path)
    full = own_pki.crt("server").read_bytes()
    pki.issue(own_pki.dir, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"], force=True)
    new_cert, new_key = own_pki.crt("server").read_bytes(), own_pki.key("server").read_bytes()
    # put the old certificate back, then write the new one in two halves with a pause
    own_pki.crt("server").write_bytes(full)
    daemon.wait_for("reload failed", timeout=10)  # key and cert disagree: refused, old state kept
    with own_pki.crt("server").open("wb") as f:
        f.write(new_cert[: len(new_cert) // 2])
        f.flush()
        time.sleep(1.0)
        f.write(new_cert[len(new_cert) // 2 :])
    assert own_pki.key("server").read_bytes() == new_key
    daemon.wait_for("reloaded tunnels=1", timeout=10)
    with tls_client(own_pki, port, "app1") as conn:
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        served = x509.load_der_x509_certificate(der)
    assert served == x509.load_pem_x509_certificate(new_cert)
    assert daemon.stop() == 0


def test_sigterm_drains_an_open_connection_then_exits_zero(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    daemon = start(tmp_path, daemons, server_file(own_pki, tmp_path, target, port))
    with tls_client(own_pki, port, "app1") as conn:
        assert echo_once(conn, b"a") == b"a"
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("draining tunnel=server open=1")
        with pytest.raises(ConnectionRefusedError):  # no new connections
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert echo_once(conn, b"b") == b"b", "open connections keep flowing while draining"
    assert daemon.process.wait(timeout=5) == 0


def test_sigterm_closes_what_is_left_after_the_drain_timeout(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    daemon = start(tmp_path, daemons, server_file(own_pki, tmp_path, target, port))
    with tls_client(own_pki, port, "app1") as conn:
        assert echo_once(conn, b"a") == b"a"
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=10) == 0
        elapsed = time.monotonic() - started
        assert is_closed(conn)
    assert 2.5 < elapsed < 6, f"drain_timeout is 3s, took {elapsed:.1f}s"


def test_a_second_sigterm_exits_at_once(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    path = server_file(own_pki, tmp_path, target, port, limits={"drain_timeout": "60s"})
    daemon = start(tmp_path, daemons, path)
    with tls_client(own_pki, port, "app1") as conn:
        assert echo_once(conn, b"a") == b"a"
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("draining")
        daemon.signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=5) == 0
        assert is_closed(conn)


def test_listen_change_rebinds_and_directory_changes_start_and_stop_tunnels(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    first, moved, second = free_port(), free_port(), free_port()
    doc = server_doc(own_pki, target.address, listen=f"127.0.0.1:{first}")
    write_yaml(conf / "a.yaml", doc)
    daemon = start(tmp_path, daemons, conf)
    with tls_client(own_pki, first, "app1") as old_conn:
        assert echo_once(old_conn, b"x") == b"x"
        doc["listen"] = f"127.0.0.1:{moved}"
        write_yaml(conf / "a.yaml", doc)
        write_yaml(conf / "b.yaml", server_doc(own_pki, target.address, listen=f"127.0.0.1:{second}"))
        assert "reloaded tunnels=2" in daemon.reload()
        assert echo_once(old_conn, b"y") == b"y", "a connection on the old address goes on"
        for port in (moved, second):
            with tls_client(own_pki, port, "app1") as conn:
                assert echo_once(conn, b"z") == b"z"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", first), timeout=2).close()
    (conf / "b.yaml").unlink()
    assert "reloaded tunnels=1" in daemon.reload()
    daemon.wait_for("tunnel b is no longer configured")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", second), timeout=2).close()
    assert daemon.stop() == 0


def test_reload_under_load_loses_no_connection_and_no_byte(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    path = server_file(own_pki, tmp_path, target, port)
    daemon = start(tmp_path, daemons, path)
    failures: list[str] = []
    sessions = [0]
    stop = threading.Event()

    def client(seed: int) -> None:
        while not stop.is_set():
            payload = os.urandom(1000 + seed * 997 % 50_000)
            try:
                with tls_client(own_pki, port, "app1" if seed % 2 else "app2") as conn:
                    got = echo_once(conn, payload)
                if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
                    failures.append(f"client {seed}: {len(got)} of {len(payload)} bytes")
                sessions[0] += 1
            except (OSError, ssl.SSLError) as exc:
                failures.append(f"client {seed}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(8):
            time.sleep(0.15)
            server_file(own_pki, tmp_path, target, port, allow={"cn": ["app1", "app2", f"extra{i}"]})
            assert "reloaded tunnels=1" in daemon.reload()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert failures == []
    assert sessions[0] > 20
    assert daemon.stop() == 0


def test_a_client_that_connected_before_a_revocation_is_judged_by_the_new_rules(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    """TCP first, revocation and reload next, handshake last: the handshake must fail."""
    port = free_port()
    daemon = start(tmp_path, daemons, server_file(own_pki, tmp_path, target, port))
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    pki.revoke(own_pki.dir, "app2")
    assert "reloaded tunnels=1" in daemon.reload()
    with own_pki.client_context("app2").wrap_socket(raw, server_hostname="localhost") as late:
        assert is_closed(late)
    daemon.wait_for("refused: revoked")
    assert target.accepted == 0
    assert daemon.stop() == 0


def test_a_failed_reload_is_retried_until_a_skewed_certificate_becomes_valid(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    """A rotation wrote a certificate whose notBefore is a few seconds ahead (clock skew at
    the issuer): the reload fails, and is tried again by itself until it takes; nobody
    writes the file a second time (cert-manager and Vault Agent do not)."""
    port, status_port = free_port(), free_port()
    path = server_file(own_pki, tmp_path, target, port, status=f"127.0.0.1:{status_port}")
    daemon = start(tmp_path, daemons, path)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    crt, key = issue_dated(
        own_pki.dir, "skewed", not_before=now + dt.timedelta(seconds=4), not_after=now + dt.timedelta(days=30),
        kind="server", out=tmp_path,
    )  # fmt: skip
    doc = yaml.safe_load(path.read_text())
    doc["tls"].update(cert=str(crt), key=str(key))
    write_atomically(path, yaml.safe_dump(doc))

    log = daemon.wait_for("reload failed")
    assert "is not valid before" in log
    assert "(now 20" in log  # the current time, in full, beside the notBefore
    shown = subprocess.run(
        [*TUNNEL, "status", f"127.0.0.1:{status_port}"], capture_output=True, text=True, timeout=10, check=False
    )
    assert "reload failing since 20" in shown.stdout, shown.stdout + shown.stderr
    assert "is not valid before" in shown.stdout

    log = daemon.wait_for("reloaded tunnels=1", timeout=20)
    assert "reload succeeded after failing since" in log
    assert log.count("reload failed") <= 2  # the same reason is logged once (twice if the first
    # try raced the file's settling), however many retries there were
    with tls_client(own_pki, port, "app1") as client:
        assert x509.load_der_x509_certificate(client.getpeercert(binary_form=True) or b"").subject.rfc4514_string() == (
            "CN=skewed"
        )
    metrics = subprocess.run(
        ["curl", "-s", f"http://127.0.0.1:{status_port}/metrics"], capture_output=True, text=True, timeout=10
    ).stdout
    assert 'tunnel_reloads_total{result="failure"}' in metrics


def test_a_ca_file_others_could_replace_is_refused_at_check_and_on_reload(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    """The attack: the CA directory was left writable (umask 000), a local user swapped
    ca.crt for "their CA + the real one", and the daemon reloaded and admitted them. Now
    the file and its mode are named, and the old state keeps serving."""
    port = free_port()
    path = server_file(own_pki, tmp_path, target, port)
    daemon = start(tmp_path, daemons, path)
    attacker = tmp_path / "attacker"
    pki.init_ca(attacker, name="test CA")
    pki.issue(attacker, "app1", kind="client")
    own_pki.dir.chmod(0o777)
    bundle = own_pki.ca.read_bytes()
    write_atomically(own_pki.ca, (attacker / "ca.crt").read_text() + bundle.decode())

    log = daemon.wait_for("reload failed")
    assert f"is in {own_pki.dir}, which is writable by every user (mode 0777)" in log
    checked = subprocess.run([*TUNNEL, "check", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 2
    assert "which is writable by every user (mode 0777)" in checked.stderr
    ctx = ssl.create_default_context(cafile=str(own_pki.ca))
    ctx.load_cert_chain(attacker / "app1.crt", attacker / "app1.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert echo_once(tls, b"let me in") == b""
        except (OSError, ssl.SSLError):
            pass
    assert target.accepted == 0
    with tls_client(own_pki, port, "app1") as client:
        assert echo_once(client, b"still the old state") == b"still the old state"
    own_pki.dir.chmod(0o700)


def test_a_tunnel_renamed_by_reload_keeps_its_address(
    pki_files: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    """The renamed tunnel is a new one on the same address: it used to try to bind the
    address the old one still held, and the reload failed (address in use)."""
    port = free_port()
    path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}"))
    daemon = DaemonProcess(tmp_path, str(path))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    with tls_client(pki_files, port, "app1") as kept:
        assert echo_once(kept, b"before") == b"before"
        doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}", name="renamed")
        write_yaml(path, doc)
        log = daemon.reload()
        assert "reloaded tunnels=1" in log, log
        assert "reload failed" not in log
        with tls_client(pki_files, port, "app1") as fresh:
            assert echo_once(fresh, b"after") == b"after"
        assert echo_once(kept, b"still open") == b"still open"
    assert "opened tunnel=renamed" in daemon.log()
    assert daemon.stop() == 0
