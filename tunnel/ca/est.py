"""The EST decisions (RFC 7030), request -> answer, without sockets.

`handle` takes one HTTP request as tunnel.http read it, the client's verified TLS
certificate (or None) and its address, and returns the answer and a log line. Three
operations, under /.well-known/est/ (RFC 7030 section 3.2.2):

* GET cacerts (4.1): the CA chain, base64 of a DER PKCS#7 certs-only, Content-Type
  application/pkcs7-mime (4.1.3);
* POST simpleenroll (4.2.1): first enrollment, authenticated by a one-time token as the
  HTTP Basic password (3.2.3); the username is ignored. The token fixes name, kind, SANs
  and lifetime;
* POST simplereenroll (4.2.2): renewal, authenticated by the client's current
  certificate (TLS client auth): the new one has the same subject, SANs, kind and
  lifetime (notAfter - notBefore).

Both enrollments take a base64 DER PKCS#10 CSR (Content-Type application/pkcs10, 4.2.1)
whose signature verifies, with a P-256, P-384 or RSA >= 2048 key, asking for no names
beyond those granted (its subject attributes and SANs a subset of them; the certificate
gets the granted ones whatever the CSR asks for, extensions included), and answer 200 with
base64 DER PKCS#7 certs-only holding the new certificate (4.2.3). Refusals: 400 (bad CSR,
weak key, names not granted, key reused on renewal), 401 (no credentials), 403 (expired
or used token, a certificate from elsewhere, revoked or expired), 404, 405 (the HTTP
layer), 415 (content type), each with the reason as a text/plain body.

Every issuance is recorded as NAME.crt in the CA directory (like `tunnel ca issue`, but
never a key: the CA never sees it), so it shows in `tunnel ca list` and `tunnel ca
revoke NAME` revokes it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel import pki
from tunnel.ca import tokens
from tunnel.http import Request, Response

PREFIX = "/.well-known/est/"
CACERTS = PREFIX + "cacerts"
SIMPLEENROLL = PREFIX + "simpleenroll"
SIMPLEREENROLL = PREFIX + "simplereenroll"
PKCS7_TYPE = "application/pkcs7-mime"
CERTS_ONLY_TYPE = "application/pkcs7-mime; smime-type=certs-only"
CSR_TYPE = "application/pkcs10"
MIN_RSA_BITS = 2048
CURVES = (ec.SECP256R1, ec.SECP384R1)
DEFAULT_DAYS = 30  # lifetime of a first enrollment when its token names none


class Refused(Exception):
    """An answer other than 200: `status` and the reason (the body and the log line)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    """What to send and what to log (one line, the requester's identity included)."""

    response: Response
    log: str


@dataclass(frozen=True)
class Authority:
    """The CA as the service uses it, read from its directory at start: the signing
    certificate and key, the intermediates above it (chain.pem, the signing one first)
    and the trust anchor (root.crt for an intermediate CA, else ca.crt)."""

    directory: Path
    cert: x509.Certificate
    key: pki.PrivateKey
    chain: tuple[x509.Certificate, ...]
    anchor: x509.Certificate

    @classmethod
    def load(cls, directory: Path) -> Authority:
        """Errors: pki.PKIError for a directory that is not an initialised CA."""
        cert, key = pki._load_ca(directory)
        chain_path, root_path = directory / pki.CHAIN_FILE, directory / pki.ROOT_CRT
        chain = tuple(x509.load_pem_x509_certificates(pki._read(chain_path))) if chain_path.exists() else ()
        anchor = pki._load_cert(root_path) if root_path.exists() else cert
        return cls(directory, cert, key, chain, anchor)

    def cacerts(self) -> list[x509.Certificate]:
        """The chain from the signing CA up to the anchor, both included."""
        return [*self.chain, self.anchor] if self.chain else [self.cert]

    def revoked(self, serial: int) -> bool:
        """Whether crl.pem (read now, so `tunnel ca revoke` takes effect at once) lists `serial`."""
        crl = pki._load_crl(self.directory, self.cert)
        return crl is not None and crl.get_revoked_certificate_by_serial_number(serial) is not None


@dataclass(frozen=True)
class Template:
    """The certificate to issue, but for its key: the name it is recorded under."""

    name: str
    subject: x509.Name
    kind: str
    sans: tuple[x509.GeneralName, ...]
    lifetime: dt.timedelta


def handle(
    request: Request,
    authority: Authority,
    *,
    peer: x509.Certificate | None,
    address: str,
    now: dt.datetime | None = None,
) -> Answer:
    """Answer one EST request (see the module's docstring). `peer` is the client's
    certificate, verified by the TLS handshake against the CA's anchor, or None; `address`
    is its HOST:PORT for the log. Never raises for bad input: a refusal is an Answer."""
    now = now or pki._now()
    who = f"{address}" + (f" (certificate {_cn(peer)!r} serial {peer.serial_number:x})" if peer else "")
    try:
        if request.path == CACERTS and request.method in ("GET", "HEAD"):
            body = _certs_only(authority.cacerts())
            return Answer(Response(200, PKCS7_TYPE, body), f"est cacerts to {who}")
        if request.path == SIMPLEENROLL and request.method == "POST":
            csr = _read_csr(request)
            grant = _redeem(request, authority, now)
            who += f" (token for {grant.name!r})"
            template = _template_from_grant(grant)
            return _issue(authority, template, csr, now, "simpleenroll", who)
        if request.path == SIMPLEREENROLL and request.method == "POST":
            current = _authenticated(peer, authority, now)
            csr = _read_csr(request)
            if _spki(csr.public_key()) == _spki(current.public_key()):
                raise Refused(400, "the CSR has the key of the current certificate: renewal requires a new key")
            template = _template_from_cert(current)
            return _issue(authority, template, csr, now, "simplereenroll", who)
        if request.path in (CACERTS, SIMPLEENROLL, SIMPLEREENROLL):
            allowed = "GET" if request.path == CACERTS else "POST"
            return Answer(
                Response(405, body=f"{request.path} takes {allowed}\n".encode(), headers=(("Allow", allowed),)),
                f"est {request.method} {request.path} from {who}: 405 method not allowed",
            )
        raise Refused(404, f"no EST operation at {request.path}")
    except Refused as refused:
        return Answer(
            Response(refused.status, body=f"{refused.reason}\n".encode()),
            f"est {request.path} from {who} refused: {refused.status} {refused.reason}",
        )


def _issue(
    authority: Authority, template: Template, csr: x509.CertificateSigningRequest, now: dt.datetime, op: str, who: str
) -> Answer:
    _check_requested_names(csr, template)
    cert = build_certificate(authority, template, csr.public_key(), now)
    record(authority, template.name, cert)
    return Answer(
        Response(200, CERTS_ONLY_TYPE, _certs_only([cert])),
        f"est {op} issued {template.name!r} ({template.kind}, serial {cert.serial_number:x}, "
        f"until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC) to {who}",
    )


def build_certificate(
    authority: Authority, template: Template, public_key: object, now: dt.datetime
) -> x509.Certificate:
    """Sign `template` for `public_key` (checked with `check_key`). Errors: Refused(503)
    if the certificate would outlive the CA's."""
    key = check_key(public_key)
    not_before = now - pki.backdate(template.lifetime)  # a 30-second certificate: 3 s, not 5 min
    not_after = not_before + template.lifetime
    if not_after > authority.cert.not_valid_after_utc:
        raise Refused(503, f"the CA certificate expires {authority.cert.not_valid_after_utc:%Y-%m-%d}: renew the CA")
    eku = ExtendedKeyUsageOID.SERVER_AUTH if template.kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(authority.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            pki._key_usage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPublicKey)), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(pki._aki(authority.cert), critical=False)
    )
    if template.sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(template.sans)), critical=False)
    return builder.sign(authority.key, hashes.SHA256())


def record(authority: Authority, name: str, cert: x509.Certificate) -> Path:
    """Write NAME.crt (the certificate, then chain.pem) in the CA directory, replacing any
    older one, as `tunnel ca issue` writes it; return its path."""
    path = authority.directory / f"{name}.crt"
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authority.chain)
    pki._write(path, cert.public_bytes(serialization.Encoding.PEM) + chain)
    return path


def check_key(public_key: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """`public_key` if it is RSA of at least MIN_RSA_BITS or EC on P-256 or P-384;
    Refused(400) otherwise."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise Refused(400, f"weak key: RSA {public_key.key_size} bits, at least {MIN_RSA_BITS} required")
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, CURVES):
            raise Refused(400, f"weak or unsupported key: EC curve {public_key.curve.name}; use P-256 or P-384")
        return public_key
    raise Refused(400, f"unsupported key type {type(public_key).__name__}: use EC P-256/P-384 or RSA >= 2048")


def _certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """Base64 (76-character lines, RFC 2045) of a DER PKCS#7 certs-only (RFC 7030 4.1.3)."""
    return base64.encodebytes(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))


def _read_csr(request: Request) -> x509.CertificateSigningRequest:
    media = (request.content_type or "").split(";")[0].strip().lower()
    if media != CSR_TYPE:
        raise Refused(415, f"Content-Type must be {CSR_TYPE} (base64 DER PKCS#10), not {request.content_type!r}")
    try:
        der = base64.b64decode(b"".join(request.body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, "the body is not base64") from None
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        raise Refused(400, "the body is not a DER PKCS#10 certificate request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature, x509.UnsupportedGeneralNameType):
        valid = False
    if not valid:
        raise Refused(400, "the CSR's signature does not verify")
    check_key(csr.public_key())
    return csr


def _redeem(request: Request, authority: Authority, now: dt.datetime) -> tokens.Grant:
    authorization = request.header("authorization") or ""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise Refused(401, "an enrollment token is required as the HTTP Basic password")
    try:
        _user, sep, token = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        raise Refused(401, "malformed HTTP Basic credentials") from None
    if not sep or not token:
        raise Refused(401, "an enrollment token is required as the HTTP Basic password")
    try:
        return tokens.redeem(authority.directory, token, now=now)
    except tokens.TokenError as exc:
        raise Refused(403, str(exc)) from None


def _authenticated(peer: x509.Certificate | None, authority: Authority, now: dt.datetime) -> x509.Certificate:
    if peer is None:
        raise Refused(401, "renewal requires TLS client authentication with the current certificate")
    try:
        peer.verify_directly_issued_by(authority.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise Refused(403, "the client certificate was not issued by this CA") from None
    if not peer.not_valid_before_utc <= now < peer.not_valid_after_utc:
        raise Refused(403, f"the client certificate expired {peer.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if authority.revoked(peer.serial_number):
        raise Refused(403, f"the client certificate (serial {peer.serial_number:x}) is revoked")
    return peer


def _template_from_cert(cert: x509.Certificate) -> Template:
    kind = pki._kind(cert)
    if kind not in pki.KINDS:
        raise Refused(403, f"the client certificate's kind is {kind!r}, not server or client")
    name = _cn(cert)
    try:
        pki._check_name(name)
    except pki.PKIError as exc:
        raise Refused(403, f"the client certificate's common name cannot name a file: {exc}") from None
    try:
        sans = tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = ()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return Template(name, cert.subject, kind, sans, lifetime)


def _template_from_grant(grant: tokens.Grant) -> Template:
    sans = tuple(pki._subject_alt_names(grant.dns, grant.ips, grant.uris))
    lifetime = dt.timedelta(days=grant.days) + pki.CLOCK_SKEW
    return Template(grant.name, pki._name(common_name=grant.name), grant.kind, sans, lifetime)


def _check_requested_names(csr: x509.CertificateSigningRequest, template: Template) -> None:
    granted = set(template.subject)
    extra = [attribute.rfc4514_string() for attribute in csr.subject if attribute not in granted]
    if extra:
        raise Refused(400, f"the CSR asks for subject {', '.join(extra)}, not granted to {template.name!r}")
    try:
        asked = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise Refused(400, f"the CSR's extensions cannot be read: {exc}") from None
    extra = [pki._format_san(name) for name in asked if name not in template.sans]
    if extra:
        raise Refused(400, f"the CSR asks for names not granted to {template.name!r}: {', '.join(extra)}")


def _cn(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
