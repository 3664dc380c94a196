"""The EST core (tunnel/ca/est.py) and enrollment tokens (tunnel/ca/tokens.py), without sockets."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel import pki
from tunnel.ca import est, tokens
from tunnel.http import Request

CSR_HEADERS = (("content-type", "application/pkcs10"),)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    pki.init_ca(directory)
    return directory


def csr_for(key: object, cn: str = "app1", sans: list[x509.GeneralName] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def basic(token: str, user: str = "app1") -> tuple[str, str]:
    return ("authorization", "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode())


def enroll_request(der: bytes, token: str | None, content_type: str = "application/pkcs10") -> Request:
    headers = [("content-type", content_type)]
    if token is not None:
        headers.append(basic(token))
    return Request("POST", est.SIMPLEENROLL, headers=tuple(headers), body=base64.encodebytes(der))


def reenroll_request(der: bytes) -> Request:
    return Request("POST", est.SIMPLEREENROLL, headers=CSR_HEADERS, body=base64.encodebytes(der))


def answer_cert(answer: est.Answer) -> x509.Certificate:
    assert answer.response.status == 200, answer.log
    assert answer.response.content_type == "application/pkcs7-mime; smime-type=certs-only"
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.response.body))
    return cert


def handle(ca: Path, request: Request, peer: x509.Certificate | None = None) -> est.Answer:
    return est.handle(request, est.Authority.load(ca), peer=peer, address="192.0.2.7:5000")


def issued(ca: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((ca / f"{name}.crt").read_bytes())


# -- tokens --------------------------------------------------------------------------------


def test_a_token_is_stored_only_as_its_hash_in_a_private_file(ca: Path) -> None:
    token = tokens.create(ca, "app1", kind="client")
    assert len(base64.urlsafe_b64decode(token)) >= 16  # at least 128 random bits
    stored = (ca / "tokens.json").read_text()
    assert token not in stored
    assert tokens.hash_token(token) in json.loads(stored)
    assert (ca / "tokens.json").stat().st_mode & 0o777 == 0o600


def test_a_token_works_once(ca: Path) -> None:
    token = tokens.create(ca, "app1", kind="client", dns=["a.example"])
    assert tokens.redeem(ca, token) == tokens.Grant("app1", "client", ("a.example",), (), (), 30)
    with pytest.raises(tokens.TokenError, match="already used"):
        tokens.redeem(ca, token)


def test_an_expired_token_is_refused(ca: Path) -> None:
    token = tokens.create(ca, "app1", kind="client", ttl=dt.timedelta(minutes=5))
    later = pki._now() + dt.timedelta(minutes=6)
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.redeem(ca, token, now=later)


def test_a_token_with_a_bad_name_or_ttl_is_not_made(ca: Path) -> None:
    with pytest.raises(pki.PKIError, match="invalid certificate name"):
        tokens.create(ca, "../x", kind="client")
    with pytest.raises(pki.PKIError, match="ttl"):
        tokens.create(ca, "app1", kind="client", ttl=dt.timedelta(days=31))


# -- cacerts and simpleenroll --------------------------------------------------------------


def test_cacerts_is_the_ca_as_base64_pkcs7(ca: Path) -> None:
    answer = handle(ca, Request("GET", est.CACERTS))
    assert answer.response.status == 200
    assert answer.response.content_type == "application/pkcs7-mime"
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.response.body))
    assert certs == [issued(ca, "ca")]


def test_simpleenroll_issues_what_the_token_grants_and_records_it(ca: Path) -> None:
    token = tokens.create(ca, "db", kind="server", dns=["db.internal"], ips=["10.0.0.5"], days=3)
    key = p256()
    answer = handle(ca, enroll_request(csr_for(key, "db"), token))
    cert = answer_cert(answer)
    assert cert.subject.rfc4514_string() == "CN=db"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["db.internal"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert cert.not_valid_after_utc - pki._now() > dt.timedelta(days=3) - dt.timedelta(minutes=1)
    cert.verify_directly_issued_by(issued(ca, "ca"))
    assert issued(ca, "db") == cert
    assert not (ca / "db.key").exists()
    assert "issued 'db'" in answer.log
    assert "192.0.2.7:5000" in answer.log
    assert "token for 'db'" in answer.log


def test_simpleenroll_without_a_token_is_401_and_with_a_used_one_403(ca: Path) -> None:
    der = csr_for(p256())
    assert handle(ca, enroll_request(der, None)).response.status == 401
    token = tokens.create(ca, "app1", kind="client")
    answer_cert(handle(ca, enroll_request(der, token)))
    answer = handle(ca, enroll_request(csr_for(p256()), token))
    assert answer.response.status == 403
    assert b"already used" in answer.response.body


def test_simpleenroll_with_an_expired_token_is_403(ca: Path) -> None:
    token = tokens.create(ca, "app1", kind="client", ttl=dt.timedelta(minutes=1))
    request = enroll_request(csr_for(p256()), token)
    answer = est.handle(
        request, est.Authority.load(ca), peer=None, address="x", now=pki._now() + dt.timedelta(minutes=2)
    )
    assert answer.response.status == 403
    assert b"expired" in answer.response.body


def test_a_csr_asking_for_names_not_granted_is_refused(ca: Path) -> None:
    token = tokens.create(ca, "app1", kind="client", dns=["app1.internal"])
    extra = csr_for(p256(), "app1", [x509.DNSName("app1.internal"), x509.DNSName("bank.example")])
    answer = handle(ca, enroll_request(extra, token))
    assert answer.response.status == 400
    assert b"DNS:bank.example" in answer.response.body
    token = tokens.create(ca, "app1", kind="client")
    answer = handle(ca, enroll_request(csr_for(p256(), "admin"), token))
    assert answer.response.status == 400
    assert b"CN=admin" in answer.response.body


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=1024), b"RSA 1024 bits"),
        (ec.generate_private_key(ec.SECP521R1()), b"secp521r1"),
        (ec.generate_private_key(ec.SECP256K1()), b"secp256k1"),
    ],
)
def test_weak_keys_are_refused(ca: Path, key: object, reason: bytes) -> None:
    token = tokens.create(ca, "app1", kind="client")
    answer = handle(ca, enroll_request(csr_for(key), token))
    assert answer.response.status == 400
    assert reason in answer.response.body


def test_a_csr_whose_signature_does_not_verify_is_refused(ca: Path) -> None:
    der = bytearray(csr_for(p256()))
    der[-5] ^= 0x01  # inside the signature
    token = tokens.create(ca, "app1", kind="client")
    answer = handle(ca, enroll_request(bytes(der), token))
    assert answer.response.status == 400
    assert b"signature" in answer.response.body or b"not a DER PKCS#10" in answer.response.body


@pytest.mark.parametrize(
    ("request_", "status", "reason"),
    [
        (Request("POST", est.SIMPLEREENROLL, headers=(("content-type", "text/plain"),), body=b"x"), 415, b"pkcs10"),
        (Request("POST", est.SIMPLEREENROLL, headers=CSR_HEADERS, body=b"%%%not base64"), 400, b"base64"),
        (Request("POST", est.SIMPLEREENROLL, headers=CSR_HEADERS, body=b"aGVsbG8="), 400, b"PKCS#10"),
        (Request("GET", "/.well-known/est/serverkeygen"), 404, b"no EST operation"),
        (Request("GET", est.SIMPLEENROLL), 405, b"POST"),
    ],
)
def test_malformed_requests_get_a_specific_status(
    ca: Path, request_: Request, status: int, reason: bytes, client: x509.Certificate
) -> None:
    answer = handle(ca, request_, peer=client)
    assert answer.response.status == status
    assert reason in answer.response.body
    assert str(status) in answer.log


# -- simplereenroll ------------------------------------------------------------------------


@pytest.fixture
def client(ca: Path) -> x509.Certificate:
    pki.issue(ca, "app1", kind="client", dns=["app1.internal"], ou="payments", days=7)
    return issued(ca, "app1")


def test_simplereenroll_keeps_subject_sans_kind_and_lifetime_with_a_new_serial(
    ca: Path, client: x509.Certificate
) -> None:
    answer = handle(ca, reenroll_request(csr_for(p256(), "app1")), peer=client)
    cert = answer_cert(answer)
    assert cert.serial_number != client.serial_number
    assert cert.subject == client.subject
    san = x509.SubjectAlternativeName
    assert cert.extensions.get_extension_for_class(san) == client.extensions.get_extension_for_class(san)
    eku = x509.ExtendedKeyUsage
    assert cert.extensions.get_extension_for_class(eku) == client.extensions.get_extension_for_class(eku)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == client.not_valid_after_utc - client.not_valid_before_utc
    assert issued(ca, "app1") == cert
    assert f"certificate 'app1' serial {client.serial_number:x}" in answer.log


def test_simplereenroll_of_a_short_lived_certificate_is_valid_now_for_its_whole_lifetime(ca: Path) -> None:
    """A 30-second certificate renews as a 30-second certificate backdated by a tenth of
    its lifetime (as `tunnel ca issue --lifetime` does), not by the five minutes of
    CLOCK_SKEW, which would have made it expired when issued."""
    pki.issue(ca, "app2", kind="client", lifetime=dt.timedelta(seconds=30))
    current = issued(ca, "app2")
    before = dt.datetime.now(dt.UTC)
    cert = answer_cert(handle(ca, reenroll_request(csr_for(p256(), "app2")), peer=current))
    lifetime = current.not_valid_after_utc - current.not_valid_before_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == lifetime
    assert cert.not_valid_before_utc >= before.replace(microsecond=0) - dt.timedelta(seconds=4)
    assert cert.not_valid_after_utc > before + dt.timedelta(seconds=25)


def test_simplereenroll_refuses_the_current_key(ca: Path, client: x509.Certificate) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key((ca / "app1.key").read_bytes(), None)
    answer = handle(ca, reenroll_request(csr_for(key)), peer=client)
    assert answer.response.status == 400
    assert b"new key" in answer.response.body


def test_simplereenroll_without_a_certificate_is_401(ca: Path) -> None:
    assert handle(ca, reenroll_request(csr_for(p256()))).response.status == 401


def test_simplereenroll_with_a_revoked_certificate_is_403(ca: Path, client: x509.Certificate) -> None:
    pki.revoke(ca, "app1")
    answer = handle(ca, reenroll_request(csr_for(p256())), peer=client)
    assert answer.response.status == 403
    assert b"revoked" in answer.response.body


def test_simplereenroll_with_an_expired_certificate_is_403(ca: Path, client: x509.Certificate) -> None:
    later = client.not_valid_after_utc + dt.timedelta(seconds=1)
    answer = est.handle(reenroll_request(csr_for(p256())), est.Authority.load(ca), peer=client, address="x", now=later)
    assert answer.response.status == 403
    assert b"expired" in answer.response.body


def test_simplereenroll_with_a_certificate_of_another_ca_is_403(tmp_path: Path, ca: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue(other, "app1", kind="client")
    answer = handle(ca, reenroll_request(csr_for(p256())), peer=issued(other, "app1"))
    assert answer.response.status == 403
    assert b"not issued by this CA" in answer.response.body


def test_simplereenroll_refuses_other_names(ca: Path, client: x509.Certificate) -> None:
    answer = handle(ca, reenroll_request(csr_for(p256(), "app1", [x509.DNSName("other")])), peer=client)
    assert answer.response.status == 400
    assert b"DNS:other" in answer.response.body
