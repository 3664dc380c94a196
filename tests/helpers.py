"""Shared test helpers: a private CA on disk, tunnel YAML files, and small trio servers."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel import pki
from tunnel.config import load_file
from tunnel.state import TunnelState
from tunnel.tunnel import Tunnel


@dataclass(frozen=True)
class PKI:
    """Certificates for tests: one CA with a server and clients, and a stranger CA."""

    dir: Path
    other: Path  # a second CA, nobody trusts it

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def fingerprint(self, name: str) -> str:
        cert = x509.load_pem_x509_certificate(self.crt(name).read_bytes())
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def server_context(self) -> ssl.SSLContext:
        """A plain stdlib server context presenting `server`, requiring a client certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.crt("server"), self.key("server"))
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, name: str, *, ca: Path | None = None) -> ssl.SSLContext:
        """A plain stdlib client context presenting `name` (from this CA or `other`)."""
        ctx = ssl.create_default_context(cafile=str(ca or self.ca))
        if name:
            base = self.other if name.startswith("other-") else self.dir
            ctx.load_cert_chain(base / f"{name}.crt", base / f"{name}.key")
        return ctx


def make_pki(root: Path) -> PKI:
    ca_dir = root / "ca"
    pki.init_ca(ca_dir, name="test CA")
    pki.issue(ca_dir, "server", kind="server", dns=["localhost"], ips=["127.0.0.1", "::1"])
    pki.issue(ca_dir, "app1", kind="client")
    pki.issue(ca_dir, "app2", kind="client", ou="payments", uris=["spiffe://example.org/app2"])
    pki.issue(ca_dir, "stranger", kind="client")
    _issue_expired(ca_dir, "expired")
    other = root / "other"
    pki.init_ca(other, name="other CA")
    pki.issue(other, "other-app1", kind="client")
    pki.issue(other, "other-server", kind="server", dns=["localhost"], ips=["127.0.0.1"])
    return PKI(dir=ca_dir, other=other)


def _issue_expired(ca_dir: Path, name: str) -> None:
    now = dt.datetime.now(dt.UTC)
    issue_dated(ca_dir, name, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))


CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def ca_material(ca_dir: Path) -> tuple[x509.Certificate, CAKey]:
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return cert, key


def write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    """An unencrypted PKCS#8 key, mode 0600 (a key every user can read is refused)."""
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def issue_dated(
    ca_dir: Path,
    name: str,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    kind: str = "client",
    out: Path | None = None,
) -> tuple[Path, Path]:
    """NAME.crt/NAME.key (in `out`, default ca_dir) signed by the CA in ca_dir, with any
    validity: what `pki.issue` will not make. A client certificate, or a server one for
    localhost."""
    ca_cert, ca_key = ca_material(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if kind == "server":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory = out or ca_dir
    crt_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key_path, key)
    return crt_path, key_path


def issue_odd(
    ca_dir: Path,
    name: str,
    *,
    kind: str = "client",
    ca: bool = False,
    cns: Sequence[str] | None = None,
    out: Path | None = None,
) -> tuple[Path, Path]:
    """NAME.crt/NAME.key signed by the CA in ca_dir, valid now, with what `pki.issue` will
    not make: basicConstraints CA:TRUE (with what OpenSSL's strict mode asks of a CA:
    critical, keyCertSign, key identifiers), or a subject of several CNs (`cns`, default
    just NAME). A client certificate, or a server one for localhost and 127.0.0.1. Written
    to `out` (default ca_dir)."""
    ca_cert, ca_key = ca_material(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in (cns or [name])])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, ca, ca, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if kind == "server":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    crt_path, key_path = (out or ca_dir) / f"{name}.crt", (out or ca_dir) / f"{name}.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key_path, key)
    return crt_path, key_path


def write_crl(
    ca_dir: Path,
    path: Path,
    *,
    last_update: dt.datetime,
    next_update: dt.datetime,
    revoked: tuple[int, ...] = (),
    encoding: serialization.Encoding = serialization.Encoding.PEM,
) -> Path:
    """A CRL signed by the CA in ca_dir, with the given dates and revoked serials."""
    ca_cert, ca_key = ca_material(ca_dir)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(7), critical=False)
    )
    for serial in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last_update).build()
        builder = builder.add_revoked_certificate(entry)
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(encoding))
    return path


def write_large_crl(ca_dir: Path, path: Path, entries: int) -> Path:
    """A CRL revoking `entries` made-up serials, signed by the CA in ca_dir for a day, made
    by `openssl ca -gencrl` from an index file (cryptography's builder takes seconds per
    ten thousand entries; openssl, a fraction of a second for a hundred thousand)."""
    work = path.parent / f".{path.name}.openssl"
    work.mkdir()
    with (work / "index.txt").open("w") as index:
        for i in range(entries):
            index.write(f"R\t300101000000Z\t250101000000Z\t{0x10000000 + i:08X}\tunknown\t/CN=r{i}\n")
    (work / "crlnumber").write_text("01\n")
    (work / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\n"
        f"database = {work / 'index.txt'}\ncrlnumber = {work / 'crlnumber'}\n"
        f"certificate = {ca_dir / 'ca.crt'}\nprivate_key = {ca_dir / 'ca.key'}\n"
        "default_md = sha256\ndefault_crl_days = 1\n"
    )
    subprocess.run(
        ["openssl", "ca", "-gencrl", "-batch", "-config", str(work / "ca.cnf"), "-out", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def write_padded_chain(leaf: Path, out: Path, junk: int = 150) -> Path:
    """`leaf` (PEM) followed by `junk` unrelated self-signed certificates of about 600 bytes
    each (DER): with 150 of them, a Certificate message of some 96 KB (under OpenSSL's
    default bound of 100 KiB), what a hostile client sends to make its refusal cost more.
    One key signs them all (cheap to make)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    pems = [leaf.read_bytes()]
    for i in range(junk):
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, f"junk {i}"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "j" * 60),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 60),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        pems.append(cert.public_bytes(serialization.Encoding.PEM))
    out.write_bytes(b"".join(pems))
    return out


def make_sub_ca(parent: Path, directory: Path, name: str, *, path_length: int | None) -> Path:
    """An intermediate CA directory under `parent` with any pathLenConstraint (what
    `tunnel ca init --parent` will not make: it makes only pathLenConstraint 0). Like
    init --parent, it writes chain.pem, so that pki.issue there appends the chain."""
    parent_cert, parent_key = ca_material(parent)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(parent_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()), critical=False)
        .sign(parent_key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "ca.crt").write_bytes(pem)
    write_key(directory / "ca.key", key)
    above = (parent / "chain.pem").read_bytes() if (parent / "chain.pem").exists() else b""
    (directory / "chain.pem").write_bytes(pem + above)
    return directory


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o644)  # whatever the umask: a tunnel file others may write is refused
    return path


def server_doc(p: PKI, target: str | list[str], *, listen: str = "127.0.0.1:0", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "mode": "server",
        "listen": listen,
        "target": target,
        "tls": {"cert": str(p.crt("server")), "key": str(p.key("server")), "ca": str(p.ca)},
        "allow": {"cn": ["app1"], "ou": ["payments"]},
        "limits": {"handshake_timeout": "2s", "connect_timeout": "2s"},
    }
    doc.update(extra)
    return doc


def client_doc(p: PKI, target: str, *, name: str = "app1", listen: str = "127.0.0.1:0", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "mode": "client",
        "listen": listen,
        "target": target,
        "tls": {
            "cert": str(p.crt(name)),
            "key": str(p.key(name)),
            "ca": str(p.ca),
            "server_name": "localhost",
        },
        "limits": {"handshake_timeout": "2s", "connect_timeout": "2s"},
    }
    doc.update(extra)
    return doc


def hostport(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def running_tunnel(path: Path) -> AsyncIterator[tuple[Tunnel, str]]:
    """Run one tunnel from a YAML file in this trio run; yields it and its HOST:PORT."""
    tunnel = Tunnel(TunnelState.build(load_file(path)))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(tunnel.serve)
        yield tunnel, hostport(address) if isinstance(address, tuple) else f"unix:{address}"
        tunnel.abort()


@dataclass
class Backend:
    """A TCP server on 127.0.0.1 that counts connections and runs a handler for each."""

    port: int = 0
    accepted: int = 0
    received: list[bytes] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


Handler = Callable[[trio.SocketStream, Backend], Awaitable[None]]


@asynccontextmanager
async def backend(handler: Handler) -> AsyncIterator[Backend]:
    state = Backend()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    state.port = listeners[0].socket.getsockname()[1]

    async def serve_one(stream: trio.SocketStream) -> None:
        state.accepted += 1
        try:
            await handler(stream, state)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve_one, listeners)
        yield state
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream, state: Backend) -> None:
    """Echo until EOF, then half-close back."""
    async for data in stream:
        await stream.send_all(data)
    await stream.send_eof()


async def hash_then_reply(stream: trio.SocketStream, state: Backend) -> None:
    """Read to EOF, then send back the sha256 of what arrived: needs half-close to work."""
    digest = hashlib.sha256()
    async for data in stream:
        digest.update(data)
    await stream.send_all(digest.hexdigest().encode())
    await stream.send_eof()


async def speak_first(stream: trio.SocketStream, state: Backend) -> None:
    """Like MySQL: greet before the client says anything, then echo."""
    await stream.send_all(b"hello from the target\n")
    await echo(stream, state)


async def recv_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    async for data in stream:
        chunks.append(data)
    return b"".join(chunks)


async def tls_connect(
    p: PKI, address: str, name: str, *, server_hostname: str = "localhost", ca: Path | None = None
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS client made with trio.SSLStream (independent of the tunnel's own TLS code)."""
    host, _, port = address.rpartition(":")
    tcp = await trio.open_tcp_stream(host.strip("[]"), int(port))
    stream = trio.SSLStream(tcp, p.client_context(name, ca=ca), server_hostname=server_hostname)
    await stream.do_handshake()
    return stream


async def tcp_connect(address: str, *, source: str | None = None) -> trio.SocketStream:
    """A TCP connection to HOST:PORT, from the loopback address `source` if given (another
    source to a tunnel's per-source limits)."""
    host, _, port = address.rpartition(":")
    return await trio.open_tcp_stream(host.strip("[]"), int(port), local_address=source)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF or a reset (a refusal may end either way)."""
    chunks = []
    try:
        async for data in stream:
            chunks.append(data)
    except trio.BrokenResourceError:
        pass
    return b"".join(chunks)


def issue_hostile(ca_dir: Path, out: Path, file_name: str, cn: str, *, ou: str | None = None) -> tuple[Path, Path]:
    """A client certificate (FILE_NAME.crt/.key in `out`) signed by the CA in ca_dir, with
    any CN: newlines, escape sequences, 70,000 bytes; what pki.issue, and cryptography's
    own checks (a CN of at most 64 characters), will not make."""
    ca_cert, ca_key = ca_material(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    with warnings.catch_warnings():  # "Attribute's length must be >= 1 and <= 64": the point
        warnings.simplefilter("ignore", UserWarning)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)]
        if ou is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        subject = x509.Name(attributes)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt_path, key_path = out / f"{file_name}.crt", out / f"{file_name}.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return crt_path, key_path


async def expect_refused(connect: Callable[[], Awaitable[trio.SSLStream[trio.SocketStream]]]) -> None:
    """Connect (TLS) and expect the tunnel to end the connection without any data, during
    the handshake or, in TLS 1.3, after the client's side of it."""
    with trio.fail_after(5):
        try:
            stream = await connect()
        except (trio.BrokenResourceError, ssl.SSLError):
            return  # refused during the handshake
        async with stream:
            try:
                await stream.send_all(b"let me in")
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                return  # TLS 1.3: the refusal arrives after the client's side of the handshake
            assert data == b"", "a refused client must not get data"


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed `sock` (EOF or reset) by now, without waiting."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def echo_or_closed(stream: trio.abc.Stream, data: bytes) -> bytes:
    """Send `data` and read back as many bytes; b"" if the tunnel closed or reset it."""
    with trio.fail_after(5):
        try:
            await stream.send_all(data)
            return bytes(await stream.receive_some(len(data)))
        except trio.BrokenResourceError:
            return b""
