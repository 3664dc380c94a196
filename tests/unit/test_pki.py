"""Unit tests for the private CA (tunnel.pki)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel import pki


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_crl(directory: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())


T = TypeVar("T", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, cls: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(cls)


def public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(ext(cert, x509.SubjectAlternativeName).value)


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(ext(cert, x509.ExtendedKeyUsage).value)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    pki.init_ca(directory)
    return directory


@pytest.fixture
def ca_cert(ca_dir: Path) -> x509.Certificate:
    return load_cert(ca_dir / "ca.crt")


# -- init --------------------------------------------------------------------------------------


def test_init_writes_files_with_private_key_mode_0600(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "certs"
    pki.init_ca(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key", "crl.pem"]
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert b"BEGIN PRIVATE KEY" in (directory / "ca.key").read_bytes()  # PKCS8, unencrypted


def test_ca_certificate_is_a_self_signed_ca(ca_cert: x509.Certificate) -> None:
    assert ca_cert.subject == ca_cert.issuer
    cn = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "tunnel private CA"
    ca_cert.verify_directly_issued_by(ca_cert)
    assert isinstance(ca_cert.signature_hash_algorithm, hashes.SHA256)

    bc = ext(ca_cert, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length is None  # a root may sign intermediate CAs (tunnel ca init --parent)
    ku = ext(ca_cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = ext(ca_cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca_cert.public_key())

    now = dt.datetime.now(dt.UTC)
    assert ca_cert.not_valid_before_utc <= now
    assert ca_cert.not_valid_after_utc - now > dt.timedelta(days=3649)


def test_init_writes_an_empty_signed_crl(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    crl = load_crl(ca_dir)
    assert crl.is_signature_valid(public_key(ca_cert))
    assert len(crl) == 0
    assert crl_number(crl) == 1
    assert crl.issuer == ca_cert.subject
    assert crl.next_update_utc is not None
    validity = crl.next_update_utc - crl.last_update_utc
    assert dt.timedelta(days=179) < validity <= dt.timedelta(days=180)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca_cert, x509.SubjectKeyIdentifier).value.digest


def test_init_options_rsa_name_days(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, name="Acme CA", days=30, key_type="rsa")
    cert = load_cert(tmp_path / "ca.crt")
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    assert cert.subject.rfc4514_string() == "CN=Acme CA"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < dt.timedelta(days=31)


def test_init_refuses_to_replace_existing_ca_without_force(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(pki.PKIError, match=r"ca\.key already exists; use --force"):
        pki.init_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == before

    (ca_dir / "ca.key").unlink()
    with pytest.raises(pki.PKIError, match=r"ca\.crt already exists"):
        pki.init_ca(ca_dir)


def test_init_force_replaces_ca(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    pki.init_ca(ca_dir, force=True)
    assert load_cert(ca_dir / "ca.crt").public_key() != ca_cert.public_key()
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert not [p for p in ca_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key_type": "dsa"}, "unknown key type 'dsa'"),
        ({"days": 0}, "invalid validity 0 days"),
        ({"name": "x" * 65}, "invalid common name"),
    ],
)
def test_init_rejects_bad_options(tmp_path: Path, kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(pki.PKIError, match=message):
        pki.init_ca(tmp_path / "certs", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "certs" / "ca.key").exists()


# -- issue -------------------------------------------------------------------------------------


def test_issue_server_defaults(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    crt_path, key_path = pki.issue(ca_dir, "redis", kind="server")
    assert (crt_path, key_path) == (ca_dir / "redis.crt", ca_dir / "redis.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    cert = load_cert(crt_path)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.rfc4514_string() == "CN=redis"
    assert sans(cert) == [x509.DNSName("redis")]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # follows the CA's key type
    assert cert.public_key() == key.public_key()

    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())

    now = dt.datetime.now(dt.UTC)
    skew = now - cert.not_valid_before_utc
    assert dt.timedelta(minutes=4) < skew <= dt.timedelta(minutes=6)
    lifetime = cert.not_valid_after_utc - now
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=365)


def test_issue_server_with_explicit_sans_has_no_default_dns(ca_dir: Path) -> None:
    crt, _ = pki.issue(
        ca_dir,
        "db",
        kind="server",
        dns=["db.internal", "*.db.internal"],
        ips=["127.0.0.1", "::1"],
        uris=["spiffe://example.org/db"],
    )
    assert sans(load_cert(crt)) == [
        x509.DNSName("db.internal"),
        x509.DNSName("*.db.internal"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.UniformResourceIdentifier("spiffe://example.org/db"),
    ]


def test_issue_client_has_client_auth_and_ou(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    crt, _ = pki.issue(ca_dir, "app-1", kind="client", ou="web", days=10)
    cert = load_cert(crt)
    cert.verify_directly_issued_by(ca_cert)
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "app-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "web"
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.SubjectAlternativeName)  # no default SAN for clients
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < dt.timedelta(days=11)


def test_issue_rsa_on_request(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    crt, key_path = pki.issue(ca_dir, "legacy", kind="server", key_type="rsa")
    cert = load_cert(crt)
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    assert ext(cert, x509.KeyUsage).value.key_encipherment
    cert.verify_directly_issued_by(ca_cert)
    assert isinstance(
        serialization.load_pem_private_key(key_path.read_bytes(), password=None),
        rsa.RSAPrivateKey,
    )


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_issue_with_a_key_password_writes_an_encrypted_pkcs8_key(ca_dir: Path, key_type: str) -> None:
    crt, key_path = pki.issue(ca_dir, "redis", kind="server", key_type=key_type, key_password=b"s3cret")
    pem = key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(pem, password=None)
    # A wrong password is refused with ValueError. Its message is not fixed: about one
    # wrong password in 256 decrypts to valid CBC padding, and then the garbage fails as
    # ASN.1 ("invalid length") instead of "Bad decrypt. Incorrect password?".
    with pytest.raises(ValueError, match=r"Incorrect password|Could not deserialize"):
        serialization.load_pem_private_key(pem, password=b"wrong")
    key = serialization.load_pem_private_key(pem, password=b"s3cret")
    assert key.public_key() == load_cert(crt).public_key()
    # and OpenSSL (what the tunnel loads it with) takes it with the same password
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(crt, key_path, password=lambda: b"s3cret")


def test_issue_from_rsa_ca_defaults_to_rsa(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, key_type="rsa")
    crt, _ = pki.issue(tmp_path, "svc", kind="client")
    cert = load_cert(crt)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    cert.verify_directly_issued_by(load_cert(tmp_path / "ca.crt"))


def test_issue_refuses_existing_files_without_force(ca_dir: Path) -> None:
    crt, key = pki.issue(ca_dir, "redis", kind="server")
    before = crt.read_bytes(), key.read_bytes()
    with pytest.raises(pki.PKIError, match=r"redis\.key already exists; use --force"):
        pki.issue(ca_dir, "redis", kind="server")
    assert (crt.read_bytes(), key.read_bytes()) == before

    key.unlink()
    with pytest.raises(pki.PKIError, match=r"redis\.crt already exists"):
        pki.issue(ca_dir, "redis", kind="client")
    assert not key.exists()


def test_issue_force_replaces(ca_dir: Path) -> None:
    crt, key = pki.issue(ca_dir, "redis", kind="server")
    old_serial, old_key = load_cert(crt).serial_number, key.read_bytes()
    pki.issue(ca_dir, "redis", kind="client", force=True)
    cert = load_cert(crt)
    assert cert.serial_number != old_serial
    assert key.read_bytes() != old_key
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "with space", "ca", "x" * 65, "naïve", "a\nb"])
def test_issue_rejects_bad_names(ca_dir: Path, name: str) -> None:
    with pytest.raises(pki.PKIError, match="invalid certificate name"):
        pki.issue(ca_dir, name, kind="server")
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key", "crl.pem"]


@pytest.mark.parametrize("name", ["a", "redis-1", "db_2.prod", "X" * 64, "-x"])
def test_issue_accepts_safe_names(ca_dir: Path, name: str) -> None:
    crt, _ = pki.issue(ca_dir, name, kind="client")
    assert crt.name == f"{name}.crt"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ips": ["1.2.3"]}, r"invalid --ip value '1\.2\.3'"),
        ({"ips": ["localhost"]}, "invalid --ip value 'localhost'"),
        ({"dns": ["bad name"]}, "invalid --dns value"),
        ({"dns": ["bücher.de"]}, "invalid --dns value"),
        ({"uris": ["no-scheme"]}, "invalid --uri value"),
        ({"kind": "peer"}, "unknown certificate kind 'peer'"),
        ({"days": -1}, "invalid validity"),
        ({"days": 3651}, "would outlive the CA certificate"),
        ({"key_type": "ed25519"}, "unknown key type"),
        ({"ou": ""}, "invalid organizational unit"),
    ],
)
def test_issue_rejects_bad_values(ca_dir: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"kind": "server", **kwargs}
    with pytest.raises(pki.PKIError, match=message):
        pki.issue(ca_dir, "svc", **args)  # type: ignore[arg-type]
    assert not (ca_dir / "svc.key").exists()


def test_issue_needs_an_initialised_ca(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match=r"ca\.key and .*ca\.crt missing"):
        pki.issue(tmp_path, "redis", kind="server")
    with pytest.raises(pki.PKIError, match="does not exist"):
        pki.issue(tmp_path / "nope", "redis", kind="server")


def test_issue_rejects_a_ca_key_that_does_not_match(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(pki.PKIError, match=r"ca\.key does not match"):
        pki.issue(tmp_path / "a", "redis", kind="server")


# -- revoke ------------------------------------------------------------------------------------


def test_revoke_adds_serial_to_a_signed_crl(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    crt, _ = pki.issue(ca_dir, "app", kind="client")
    serial = pki.revoke(ca_dir, "app")
    assert serial == load_cert(crt).serial_number

    crl = load_crl(ca_dir)
    assert crl.is_signature_valid(public_key(ca_cert))
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert abs(entry.revocation_date_utc - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert crl_number(crl) == 2
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=180)


def test_revoke_keeps_earlier_entries(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    serials = []
    for name in ("a", "b", "c"):
        pki.issue(ca_dir, name, kind="client")
    pki.issue(ca_dir, "keep", kind="server")
    for name in ("a", "b", "c"):
        serials.append(pki.revoke(ca_dir, name))

    crl = load_crl(ca_dir)
    assert crl.is_signature_valid(public_key(ca_cert))
    assert sorted(entry.serial_number for entry in crl) == sorted(serials)
    assert crl_number(crl) == 4
    keep = load_cert(ca_dir / "keep.crt").serial_number
    assert crl.get_revoked_certificate_by_serial_number(keep) is None


def test_revoke_twice_is_an_error(ca_dir: Path) -> None:
    pki.issue(ca_dir, "app", kind="client")
    pki.revoke(ca_dir, "app")
    before = (ca_dir / "crl.pem").read_bytes()
    with pytest.raises(pki.PKIError, match="already revoked"):
        pki.revoke(ca_dir, "app")
    assert (ca_dir / "crl.pem").read_bytes() == before


def test_revoke_unknown_name(ca_dir: Path) -> None:
    with pytest.raises(pki.PKIError, match=r"no certificate named 'ghost'.*ghost\.crt"):
        pki.revoke(ca_dir, "ghost")


def test_revoke_refuses_a_certificate_from_another_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "other")
    crt, _ = pki.issue(tmp_path / "other", "app", kind="client")
    pki.init_ca(tmp_path / "mine")
    (tmp_path / "mine" / "app.crt").write_bytes(crt.read_bytes())
    with pytest.raises(pki.PKIError, match="not issued by the CA"):
        pki.revoke(tmp_path / "mine", "app")


def test_revoke_refuses_a_crl_not_signed_by_the_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "other")
    pki.init_ca(tmp_path / "mine")
    pki.issue(tmp_path / "mine", "app", kind="client")
    (tmp_path / "mine" / "crl.pem").write_bytes((tmp_path / "other" / "crl.pem").read_bytes())
    with pytest.raises(pki.PKIError, match=r"crl\.pem is not signed by the CA"):
        pki.revoke(tmp_path / "mine", "app")


# -- list / describe / fingerprint ---------------------------------------------------------------


def test_list_issued(ca_dir: Path) -> None:
    assert pki.list_issued(ca_dir) == []
    pki.issue(ca_dir, "web", kind="server", days=30)
    pki.issue(ca_dir, "app", kind="client")
    serial = pki.revoke(ca_dir, "app")

    issued = pki.list_issued(ca_dir)
    assert [(c.name, c.kind, c.revoked) for c in issued] == [
        ("app", "client", True),
        ("web", "server", False),
    ]
    app, web = issued
    assert app.serial == serial
    assert app.path == ca_dir / "app.crt"
    assert web.not_after == load_cert(ca_dir / "web.crt").not_valid_after_utc
    assert web.not_after.tzinfo is not None
    assert (app.status(), web.status()) == ("revoked", "valid")
    assert web.status(now=web.not_after + dt.timedelta(seconds=1)) == "expired"


def test_list_issued_reports_a_ca_certificate_as_ca(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    # A CA certificate under another name (as init --parent leaves an intermediate's copy).
    (ca_dir / "copy.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
    [entry] = pki.list_issued(ca_dir)
    assert (entry.name, entry.kind, entry.serial) == ("copy", "ca", ca_cert.serial_number)


def test_describe_certificate(ca_dir: Path) -> None:
    crt, _ = pki.issue(ca_dir, "redis", kind="server", ips=["10.0.0.1"], dns=["redis.local"])
    cert = load_cert(crt)
    text = pki.describe(crt)
    assert "CN=redis" in text
    assert "CN=tunnel private CA" in text
    assert f"{cert.serial_number:x}" in text
    assert "DNS:redis.local" in text
    assert "IP:10.0.0.1" in text
    assert "serverAuth" in text
    assert "CA:         no" in text
    assert pki.fingerprint(cert) in text
    assert f"{cert.not_valid_after_utc:%Y-%m-%d}" in text

    assert "CA:         yes" in pki.describe(ca_dir / "ca.crt")


def test_describe_crl(ca_dir: Path) -> None:
    assert "Revoked:     none" in pki.describe(ca_dir / "crl.pem")
    pki.issue(ca_dir, "app", kind="client")
    serial = pki.revoke(ca_dir, "app")
    text = pki.describe(ca_dir / "crl.pem")
    assert text.startswith("Certificate revocation list:")
    assert "CN=tunnel private CA" in text
    assert f"{serial:x}" in text
    assert "CRL number:  2" in text


def test_describe_rejects_other_files(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match=r"ca\.key is neither a PEM certificate nor a PEM CRL"):
        pki.describe(ca_dir / "ca.key")
    with pytest.raises(pki.PKIError, match="does not exist"):
        pki.describe(tmp_path / "missing.pem")


def test_fingerprint_is_sha256_of_der(ca_cert: x509.Certificate) -> None:
    import hashlib

    der = ca_cert.public_bytes(serialization.Encoding.DER)
    assert pki.fingerprint(ca_cert) == hashlib.sha256(der).hexdigest()


# -- OpenSSL accepts what we issue -----------------------------------------------------------------


def _pump(client: ssl.SSLObject, server: ssl.SSLObject, bios: list[ssl.MemoryBIO]) -> None:
    """Run both handshakes over memory BIOs; re-raises the first SSL error."""
    c_in, c_out, s_in, s_out = bios
    done: set[int] = set()
    for _ in range(20):
        for i, obj in enumerate((client, server)):
            if i in done:
                continue
            try:
                obj.do_handshake()
                done.add(i)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(done) == 2:
            return
    raise AssertionError("handshake did not complete")


def _contexts(ca_dir: Path, server: str, client: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(ca_dir / f"{server}.crt", ca_dir / f"{server}.key")
    server_ctx.load_verify_locations(ca_dir / "ca.crt")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(ca_dir / f"{client}.crt", ca_dir / f"{client}.key")
    client_ctx.load_verify_locations(ca_dir / "ca.crt")
    assert client_ctx.check_hostname
    assert client_ctx.verify_mode == ssl.CERT_REQUIRED
    return server_ctx, client_ctx


def _connect(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject, list[ssl.MemoryBIO]]:
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname=hostname)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    _pump(client, server, bios)
    return client, server, bios


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_issued_certificates_complete_an_mtls_handshake(tmp_path: Path, key_type: str) -> None:
    pki.init_ca(tmp_path, key_type=key_type)
    pki.issue(tmp_path, "redis", kind="server")
    pki.issue(tmp_path, "app", kind="client")
    client, server, bios = _connect(*_contexts(tmp_path, "redis", "app"), hostname="redis")

    client.write(b"ping")
    bios[2].write(bios[1].read())
    assert server.read() == b"ping"
    peer = server.getpeercert()
    assert peer is not None
    assert peer["subject"] == ((("commonName", "app"),),)


def test_handshake_fails_for_wrong_hostname(ca_dir: Path) -> None:
    pki.issue(ca_dir, "redis", kind="server")
    pki.issue(ca_dir, "app", kind="client")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _connect(*_contexts(ca_dir, "redis", "app"), hostname="postgres")


def test_handshake_rejects_a_client_certificate_used_as_server(ca_dir: Path) -> None:
    pki.issue(ca_dir, "app", kind="client", dns=["app"])  # right name, wrong usage
    pki.issue(ca_dir, "other", kind="client")
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        _connect(*_contexts(ca_dir, "app", "other"), hostname="app")


def test_openssl_honours_the_crl(ca_dir: Path) -> None:
    pki.issue(ca_dir, "redis", kind="server")
    pki.issue(ca_dir, "app", kind="client")
    pki.issue(ca_dir, "bad", kind="client")
    pki.revoke(ca_dir, "bad")

    def contexts(client: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        server_ctx, client_ctx = _contexts(ca_dir, "redis", client)
        server_ctx.load_verify_locations(ca_dir / "crl.pem")
        server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return server_ctx, client_ctx

    _connect(*contexts("app"), hostname="redis")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
        _connect(*contexts("bad"), hostname="redis")


def test_a_short_lifetime_is_not_backdated_by_minutes(ca_dir: Path) -> None:
    """A 30-second certificate backdated by the usual 5 minutes would look nine-tenths
    spent when issued, and renew at once."""
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    crt, _ = pki.issue(ca_dir, "brief", kind="client", lifetime=dt.timedelta(seconds=30))
    cert = load_cert(crt)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(seconds=33)
    assert cert.not_valid_before_utc >= before - dt.timedelta(seconds=4)
    crt, _ = pki.issue(ca_dir, "yearly", kind="client")
    cert = load_cert(crt)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=365, minutes=5)


def test_a_lifetime_must_be_positive(ca_dir: Path) -> None:
    with pytest.raises(pki.PKIError, match="more than zero"):
        pki.issue(ca_dir, "never", kind="client", lifetime=dt.timedelta(0))
