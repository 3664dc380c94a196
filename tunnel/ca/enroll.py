"""`tunnel ca enroll`: first enrollment of this host against `tunnel ca serve` (EST,
RFC 7030), with a one-time token.

1. Makes the key here (EC P-256): the CA never sees it.
2. Fetches /.well-known/est/cacerts over TLS without trusting the server yet, and keeps
   the certificate whose SHA-256 fingerprint is the one given (`tunnel ca show
   DIR/ca.crt`, "SHA-256"; for an intermediate CA, its root.crt): that is the trust
   anchor (RFC 7030 4.1.1, "manual authorization" by an out-of-band fingerprint). The
   fingerprint is required: without it anyone on the path could answer with their CA.
3. POSTs the CSR to /.well-known/est/simpleenroll over TLS verified against that anchor
   (hostname included), the token as the HTTP Basic password (RFC 7030 3.2.3).
4. Checks the answer is a certificate for that key chaining to the anchor, and writes
   NAME.key (0600), NAME.crt (the certificate and the intermediates) and ca.crt (the
   anchor) in the output directory (created 0700).
"""

from __future__ import annotations

import base64
import binascii
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from tunnel import http, pki
from tunnel.ca import est

TIMEOUT = 15.0  # seconds for each exchange with the server, connection included


class EnrollError(Exception):
    """Enrollment failed: the server could not be reached or refused (its status and
    reason in the message), or its answer could not be trusted."""


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of an https:// URL (port 443 if none). Errors: EnrollError."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise EnrollError(f"invalid --url {url!r}: expected https://HOST[:PORT]")
    try:
        return parts.hostname, parts.port or 443
    except ValueError as exc:
        raise EnrollError(f"invalid --url {url!r}: {exc}") from None


async def enroll(url: str, token: str, fingerprint: str, out: Path) -> tuple[Path, Path, Path]:
    """Enroll as out.name into out.parent; return the (NAME.crt, NAME.key, ca.crt) written.
    Errors: EnrollError; pki.PKIError for a bad name or an existing NAME.key."""
    host, port = parse_url(url)
    name, directory = out.name, out.parent
    pki._check_name(name)
    crt_path, key_path, ca_path = directory / f"{name}.crt", directory / f"{name}.key", directory / pki.CA_CRT
    pki._refuse_existing(key_path)
    pin = fingerprint.replace(":", "").lower()

    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    answer = await _exchange(host, port, insecure, "GET", est.CACERTS, {}, b"")
    cacerts = _certs(answer, "cacerts")
    anchor = next((c for c in cacerts if pki.fingerprint(c) == pin), None)
    if anchor is None:
        raise EnrollError(
            f"no CA certificate from {url} has SHA-256 fingerprint {pin}: "
            f"it sent {', '.join(pki.fingerprint(c) for c in cacerts)}"
        )
    intermediates = [c for c in cacerts if c is not anchor]

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    trusted = ssl.create_default_context(cadata=anchor.public_bytes(serialization.Encoding.PEM).decode())
    credentials = base64.b64encode(f"{name}:{token}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}", "Content-Type": est.CSR_TYPE}
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
    answer = await _exchange(host, port, trusted, "POST", est.SIMPLEENROLL, headers, body)
    issued = _certs(answer, "simpleenroll")
    cert = issued[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise EnrollError("the server answered with a certificate for another key")
    _check_chain(cert, [*intermediates, anchor])

    pki._make_private_dir(directory)
    pki._write(key_path, pki._key_pem(key), mode=0o600)
    pem = serialization.Encoding.PEM
    pki._write(crt_path, b"".join(c.public_bytes(pem) for c in [cert, *intermediates]))
    pki._write(ca_path, anchor.public_bytes(pem))
    return crt_path, key_path, ca_path


def _check_chain(cert: x509.Certificate, cas: list[x509.Certificate]) -> None:
    current = cert
    for _ in range(len(cas) + 1):
        issuer = next((c for c in cas if c.subject == current.issuer), None)
        if issuer is None:
            break
        try:
            current.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, Exception) as exc:
            raise EnrollError(f"the issued certificate does not chain to the CA: {exc}") from None
        if issuer is cas[-1]:
            return
        current = issuer
    raise EnrollError("the issued certificate does not chain to the pinned CA")


def _certs(answer: http.Response, what: str) -> list[x509.Certificate]:
    if answer.status != 200:
        reason = answer.body.decode("utf-8", "replace").strip()
        raise EnrollError(f"{what} refused: {answer.status} {reason}")
    try:
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(answer.body.split()), validate=True))
    except (ValueError, binascii.Error) as exc:
        raise EnrollError(f"{what}: the answer is not base64 DER PKCS#7: {exc}") from None
    if not certs:
        raise EnrollError(f"{what}: the answer holds no certificate")
    return certs


async def _exchange(
    host: str, port: int, ctx: ssl.SSLContext, method: str, path: str, headers: dict[str, str], body: bytes
) -> http.Response:
    """One HTTPS request and its whole answer. Errors: EnrollError."""
    try:
        with trio.fail_after(TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, ctx, server_hostname=host)
            async with stream:
                return await _request(stream, method, path, host, headers, body)
    except trio.TooSlowError:
        raise EnrollError(f"{host}:{port}: no answer within {TIMEOUT}s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise EnrollError(f"{host}:{port}: {http._reason(exc)}") from None
    except http.NoAnswer as exc:
        raise EnrollError(f"{host}:{port}: {exc}") from None


async def _request(
    stream: trio.abc.Stream, method: str, path: str, host: str, headers: dict[str, str], body: bytes
) -> http.Response:
    connection = h11.Connection(h11.CLIENT)
    fields = [("Host", host), ("Connection", "close"), ("Content-Length", str(len(body))), *headers.items()]
    data = connection.send(h11.Request(method=method, target=path, headers=fields)) or b""
    if body:
        data += connection.send(h11.Data(data=body)) or b""
    await stream.send_all(data + (connection.send(h11.EndOfMessage()) or b""))
    try:
        head = await http._next_event(connection, stream)
        while isinstance(head, h11.InformationalResponse):
            head = await http._next_event(connection, stream)
        if not isinstance(head, h11.Response):
            raise http.NoAnswer("the server closed the connection without answering")
        answer = bytearray()
        while not isinstance(event := await http._next_event(connection, stream), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                answer += event.data
                if len(answer) > http.MAX_BODY:
                    raise http.NoAnswer(f"an answer longer than {http.MAX_BODY} bytes")
    except h11.RemoteProtocolError as exc:
        raise http.NoAnswer(f"not an HTTP answer: {exc}") from exc
    content_type = next((value for name, value in head.headers if name == b"content-type"), b"")
    return http.Response(head.status_code, content_type.decode("latin-1"), bytes(answer))
