"""`tls.renew`: renewing a tunnel's own certificate over EST before it expires.

When (pure): `renewal_due` — once `tls.renew.before` of the certificate's lifetime
(notAfter - notBefore) is left, a share ("33%") or a duration ("8h"), made earlier by up to
JITTER of the lifetime so that many tunnels issued together do not all ask at once.

How (`renew`): a new key of the current key's type (EC on the same curve, or RSA of the
same size), a PKCS#10 CSR for it with the current certificate's subject and SANs, POSTed
to the EST server's /.well-known/est/simplereenroll (RFC 7030 section 4.2.2) over mutual
TLS: the tunnel presents its current tls.cert/tls.key (RFC 7030 section 3.3.2) and checks
the server against tls.ca, the URL's host as the name. The answer (base64 DER PKCS#7
certs-only, section 4.2.3) must be a certificate for the new key chaining to tls.ca; then
the key and the certificate (the new leaf, then the intermediates the current tls.cert
had after its leaf) replace tls.key and tls.cert atomically, each through a temporary
file renamed in the same directory. The daemon (tunnel/daemon.py) schedules this and
reloads afterwards.
"""

from __future__ import annotations

import base64
import os
import secrets
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tunnel.ca import enroll, est
from tunnel.config import Renew, TLSConfig
from tunnel.passwords import read_password_file

JITTER = 0.05  # at most this share of the lifetime earlier than `before` says
RETRY_FIRST = 1.0  # seconds before a failed renewal is tried again, doubling...
RETRY_MAX = 60.0  # ...up to this


class RenewError(Exception):
    """A renewal failed: the EST server could not be reached or refused (its status and
    reason in the message), its answer could not be trusted, or the files could not be
    read or written."""


@dataclass(frozen=True)
class Renewed:
    """What a successful renewal wrote: the new certificate's serial and notAfter."""

    serial: int
    not_after: datetime


def renewal_due(not_before: datetime, not_after: datetime, renew: Renew, jitter: float) -> datetime:
    """When to renew a certificate valid from `not_before` to `not_after` (aware
    datetimes): `renew.fraction` of the lifetime, or `renew.seconds`, before notAfter,
    less `jitter` (0 to 1) times JITTER of the lifetime. Never before notBefore: a
    certificate whose renewal time is already past is due at once (the caller compares
    with now)."""
    lifetime = not_after - not_before
    before = lifetime * renew.fraction if renew.fraction is not None else timedelta(seconds=renew.seconds or 0.0)
    due = not_after - before - lifetime * (JITTER * min(max(jitter, 0.0), 1.0))
    return max(due, not_before)


async def renew(tls: TLSConfig) -> Renewed:
    """Renew tls.cert/tls.key through EST at tls.renew.url (see the module docstring).
    Errors: RenewError; nothing is written unless everything before the write succeeded."""
    assert tls.renew is not None
    host, port = _host_port(tls.renew.url)
    try:
        password = read_password_file(tls.key_password_file) if tls.key_password_file is not None else None
        current_key = serialization.load_pem_private_key(tls.key.read_bytes(), password)
        chain = x509.load_pem_x509_certificates(tls.cert.read_bytes())
        cas = x509.load_pem_x509_certificates(tls.ca.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise RenewError(f"cannot read the current key and certificate: {exc}") from None
    leaf, intermediates = chain[0], chain[1:]
    key = await trio.to_thread.run_sync(_new_key_like, current_key)  # RSA takes a while
    csr = _csr(leaf, key)
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        ctx.load_cert_chain(str(tls.cert), str(tls.key), password=lambda: password or b"")
    except (OSError, ssl.SSLError) as exc:
        raise RenewError(f"cannot use the current key and certificate: {exc}") from None
    headers = {"Content-Type": est.CSR_TYPE}
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
    try:
        answer = await enroll._exchange(host, port, ctx, "POST", est.SIMPLEREENROLL, headers, body)
        cert = enroll._certs(answer, "simplereenroll")[0]
        _check_answer(cert, key, [*intermediates, *cas])
    except enroll.EnrollError as exc:
        raise RenewError(str(exc)) from None

    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption(),
    )
    cert_pem = b"".join(c.public_bytes(pem) for c in [cert, *intermediates])
    try:
        await trio.to_thread.run_sync(write_pair, tls.key, key_pem, tls.cert, cert_pem)
    except OSError as exc:
        raise RenewError(f"cannot write the renewed key and certificate: {exc}") from None
    return Renewed(cert.serial_number, cert.not_valid_after_utc)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise RenewError(f"invalid tls.renew.url {url!r}")
    return parts.hostname, parts.port or 443


def _new_key_like(current: object) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if isinstance(current, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(current.curve)
    if isinstance(current, rsa.RSAPrivateKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=current.key_size)
    raise RenewError(f"cannot renew a {type(current).__name__}: only EC and RSA keys")


def _csr(leaf: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.CertificateSigningRequest:
    """Same subject and SANs as the current certificate (RFC 7030 section 4.2.2)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(leaf.subject)
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        builder = builder.add_extension(sans, critical=False)
    except x509.ExtensionNotFound:
        pass
    return builder.sign(key, hashes.SHA256())


def _check_answer(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cas: list[x509.Certificate]
) -> None:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise RenewError("the EST server answered with a certificate for another key")
    issuer = next((c for c in cas if c.subject == cert.issuer), None)
    if issuer is None:
        raise RenewError("the renewed certificate's issuer is neither in tls.cert nor in tls.ca")
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise RenewError(f"the renewed certificate is not signed by its issuer: {exc}") from None


def write_pair(key_path: Path, key_pem: bytes, cert_path: Path, cert_pem: bytes) -> None:
    """Replace the key (mode 0600) and the certificate (its current mode) atomically: both
    written to temporary files in their directories first, then renamed one right after
    the other. Errors: OSError (nothing replaced unless the first rename happened)."""
    try:
        cert_mode = cert_path.stat().st_mode & 0o777
    except FileNotFoundError:
        cert_mode = 0o644
    key_tmp = _temporary(key_path, key_pem, 0o600)
    try:
        cert_tmp = _temporary(cert_path, cert_pem, cert_mode)
    except BaseException:
        key_tmp.unlink(missing_ok=True)
        raise
    try:
        os.replace(key_tmp, key_path)
        os.replace(cert_tmp, cert_path)
    finally:
        key_tmp.unlink(missing_ok=True)
        cert_tmp.unlink(missing_ok=True)


def _temporary(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # past the umask
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
