"""The private CA with ``cryptography``: init, issue, revoke, CRL, inspect."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_KEY = "ca.key"
CA_CRT = "ca.crt"
CRL_FILE = "crl.pem"
CHAIN_FILE = "chain.pem"  # an intermediate CA's directory: its certificate and those above it, not the root
ROOT_CRT = "root.crt"  # an intermediate CA's directory: the root its chain ends at (what tls.ca names)
KEY_TYPES = ("ec", "rsa")
KINDS = ("server", "client")
CRL_VALIDITY = dt.timedelta(days=180)
CLOCK_SKEW = dt.timedelta(minutes=5)
ROOT_DAYS = 3650
INTERMEDIATE_DAYS = 1825

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_DNS_RE = re.compile(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_-]+)*\.?")
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PKIError(Exception):
    """A user-facing CA failure: bad input, missing or conflicting files."""


@dataclass(frozen=True)
class IssuedCert:
    """One leaf certificate found in the CA directory."""

    name: str
    kind: str  # "server", "client" or "unknown" (from the extended key usage)
    serial: int
    not_after: dt.datetime
    revoked: bool
    path: Path

    def status(self, now: dt.datetime | None = None) -> str:
        """Return "revoked", "expired" or "valid"."""
        if self.revoked:
            return "revoked"
        return "expired" if self.not_after <= (now or _now()) else "valid"


def init_ca(
    directory: Path,
    *,
    name: str = "tunnel private CA",
    days: int | None = None,
    key_type: str = "ec",
    force: bool = False,
    parent: Path | None = None,
) -> None:
    """Create a CA (ca.key, ca.crt) and an empty CRL (crl.pem) in *directory*.

    Without *parent*, a self-signed root. With *parent* (another CA directory), an
    intermediate CA signed by that one, which can then go offline: *directory* also gets
    chain.pem (the intermediates from this one up, for issued certificates to carry) and
    root.crt (the anchor tunnels name in tls.ca), and the parent directory gets a copy of
    the intermediate's certificate named after *directory*, so that `revoke` there can
    revoke it. An intermediate may not sign further CAs (pathLenConstraint 0). Validity:
    *days*, by default ROOT_DAYS for a root and INTERMEDIATE_DAYS for an intermediate."""
    if days is None:
        days = ROOT_DAYS if parent is None else INTERMEDIATE_DAYS
    _check_days(days)
    _check_key_type(key_type)
    subject = _name(common_name=name)
    issuer: tuple[x509.Certificate, PrivateKey] | None = None
    copy_path: Path | None = None
    if parent is not None:
        issuer = _load_ca(parent)
        _check_may_sign_a_ca(parent, issuer[0])
        copy_path = parent / f"{directory.resolve().name}.crt"
        _check_name(copy_path.stem)
        if not force:
            _refuse_existing(copy_path)
    _make_private_dir(directory)
    key_path, crt_path = directory / CA_KEY, directory / CA_CRT
    if not force:
        _refuse_existing(key_path, crt_path)

    key = _generate_key(key_type)
    now = _now()
    not_after = now + dt.timedelta(days=days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        cert = (
            builder.issuer_name(subject)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
    else:
        parent_cert, parent_key = issuer
        assert parent is not None
        if not_after > parent_cert.not_valid_after_utc:
            raise PKIError(
                f"a {days}-day CA would outlive its parent {parent / CA_CRT} "
                f"(expires {parent_cert.not_valid_after_utc:%Y-%m-%d}); use fewer --days"
            )
        cert = (
            builder.issuer_name(parent_cert.subject)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_aki(parent_cert), critical=False)
            .sign(parent_key, hashes.SHA256())
        )
    _write(key_path, _key_pem(key), mode=0o600)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    _write_crl(directory, cert, key, [], number=1)
    if parent is not None and copy_path is not None:
        above = _read(parent / CHAIN_FILE) if (parent / CHAIN_FILE).exists() else b""
        root = _read(parent / ROOT_CRT) if (parent / ROOT_CRT).exists() else _read(parent / CA_CRT)
        _write(directory / CHAIN_FILE, cert.public_bytes(serialization.Encoding.PEM) + above)
        _write(directory / ROOT_CRT, root)
        _write(copy_path, cert.public_bytes(serialization.Encoding.PEM))
    else:
        for stale in (directory / CHAIN_FILE, directory / ROOT_CRT):
            stale.unlink(missing_ok=True)


def _check_may_sign_a_ca(directory: Path, ca_cert: x509.Certificate) -> None:
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise PKIError(f"{directory / CA_CRT} has no basicConstraints: it cannot sign a CA") from None
    if not constraints.ca or constraints.path_length == 0:
        raise PKIError(
            f"{directory / CA_CRT} may not sign CAs (pathLenConstraint 0): make intermediates directly under the root"
        )


def _make_private_dir(directory: Path) -> None:
    """Create *directory* and any missing parents 0700 whatever the umask: a CA directory
    others could write would let them swap the CA certificate tunnels trust. Directories
    that exist already are left as they are."""
    missing = [d for d in [directory, *directory.parents] if not d.exists()]
    try:
        for path in reversed(missing):
            path.mkdir(mode=0o700)
            path.chmod(0o700)  # mkdir's mode is cut by the umask, never widened: say it outright
    except FileExistsError:
        pass
    except OSError as exc:
        raise PKIError(f"cannot create CA directory {directory}: {exc.strerror}") from exc


def issue(
    directory: Path,
    name: str,
    *,
    kind: str,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    ou: str | None = None,
    days: int = 365,
    force: bool = False,
    key_type: str | None = None,
    key_password: bytes | None = None,
    lifetime: dt.timedelta | None = None,
) -> tuple[Path, Path]:
    """Issue a server or client certificate NAME.crt/NAME.key; return (crt_path, key_path).
    Valid for *lifetime* if given (short-lived certificates: `24h`, `30s`), else *days*.
    With *key_password*, NAME.key is encrypted with it (PKCS#8; tunnel files then need
    tls.key_password_file)."""
    _check_name(name)
    if kind not in KINDS:
        raise PKIError(f"unknown certificate kind {kind!r}; expected one of {', '.join(KINDS)}")
    _check_days(days)
    if lifetime is not None and lifetime <= dt.timedelta(0):
        raise PKIError("the lifetime must be more than zero")
    valid = lifetime if lifetime is not None else dt.timedelta(days=days)
    if key_type is not None:
        _check_key_type(key_type)
    sans = _subject_alt_names(dns, ips, uris)
    if kind == "server" and not sans:
        sans = [x509.DNSName(name)]
    subject = _name(common_name=name, unit=ou)
    ca_cert, ca_key = _load_ca(directory)
    crt_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    if not force:
        _refuse_existing(key_path, crt_path)

    now = _now()
    not_after = now + valid
    if not_after > ca_cert.not_valid_after_utc:
        raise PKIError(
            f"a certificate valid {_span(valid)} would outlive the CA certificate "
            f"{directory / CA_CRT} (expires {ca_cert.not_valid_after_utc:%Y-%m-%d}); "
            "use fewer --days"
        )
    key = _generate_key(key_type or _key_type_of(ca_key))
    eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate(valid))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    chain = directory / CHAIN_FILE
    _write(key_path, _key_pem(key, key_password), mode=0o600)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM) + (_read(chain) if chain.exists() else b""))
    return crt_path, key_path


def revoke(directory: Path, name: str) -> int:
    """Add NAME.crt's serial to crl.pem (re-signed, CRL number + 1); return the serial."""
    _check_name(name)
    ca_cert, ca_key = _load_ca(directory)
    crt_path = directory / f"{name}.crt"
    if not crt_path.exists():
        raise PKIError(f"no certificate named {name!r}: {crt_path} does not exist")
    cert = _load_cert(crt_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PKIError(f"{crt_path} was not issued by the CA in {directory}") from exc
    crl = _load_crl(directory, ca_cert)
    entries = list(crl) if crl is not None else []
    if any(entry.serial_number == cert.serial_number for entry in entries):
        raise PKIError(f"{crt_path} (serial {cert.serial_number:x}) is already revoked")
    entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(_now()).build()
    _write_crl(directory, ca_cert, ca_key, [*entries, entry], number=_crl_number(crl) + 1)
    return cert.serial_number


def refresh_crl(directory: Path) -> dt.datetime:
    """Re-sign crl.pem with the same entries and a new next-update; return that time."""
    ca_cert, ca_key = _load_ca(directory)
    crl = _load_crl(directory, ca_cert)
    entries = list(crl) if crl is not None else []
    _write_crl(directory, ca_cert, ca_key, entries, number=_crl_number(crl) + 1)
    return _now() + CRL_VALIDITY


def list_issued(directory: Path) -> list[IssuedCert]:
    """Every certificate in *directory* except the CA's, sorted by name."""
    ca_cert = _load_ca_cert(directory)
    crl = _load_crl(directory, ca_cert)
    revoked = {entry.serial_number for entry in crl} if crl is not None else set()
    issued = []
    for path in sorted(directory.glob("*.crt")):
        if path.name in (CA_CRT, ROOT_CRT):
            continue
        cert = _load_cert(path)
        issued.append(
            IssuedCert(
                name=path.stem,
                kind=_kind(cert),
                serial=cert.serial_number,
                not_after=cert.not_valid_after_utc,
                revoked=cert.serial_number in revoked,
                path=path,
            )
        )
    return issued


def describe(path: Path) -> str:
    """Human-readable summary of a PEM certificate or CRL."""
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if len(certs) == 1:
        return _describe_cert(certs[0])
    if certs:
        return "\n".join(
            _describe_cert(cert, f"Certificate {i} of {len(certs)}{' (leaf)' if i == 1 else ''}")
            for i, cert in enumerate(certs, 1)
        )
    try:
        return _describe_crl(x509.load_pem_x509_crl(data))
    except ValueError:
        pass
    raise PKIError(f"{path} is neither a PEM certificate nor a PEM CRL")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex without colons."""
    return cert.fingerprint(hashes.SHA256()).hex()


# -- helpers ---------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def backdate(lifetime: dt.timedelta) -> dt.timedelta:
    """How far before now a certificate's notBefore goes, for clocks a little behind the
    issuer's: CLOCK_SKEW, or a tenth of a short lifetime (a 30-second certificate is not
    backdated by minutes, which would make it look two-thirds spent when issued)."""
    return min(CLOCK_SKEW, lifetime / 10)


def _span(valid: dt.timedelta) -> str:
    return f"{valid.days} days" if valid.days and not valid.seconds else str(valid)


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name == "ca":
        raise PKIError(
            f"invalid certificate name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "not starting with '.', and not 'ca'"
        )


def _check_days(days: int) -> None:
    if days < 1:
        raise PKIError(f"invalid validity {days} days: must be at least 1")


def _check_key_type(key_type: str) -> None:
    if key_type not in KEY_TYPES:
        raise PKIError(f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")


def _name(*, common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [(NameOID.COMMON_NAME, "common name", common_name)]
    if unit is not None:
        attrs.append((NameOID.ORGANIZATIONAL_UNIT_NAME, "organizational unit", unit))
    result = []
    for oid, label, value in attrs:
        if not 1 <= len(value.encode()) <= 64:
            raise PKIError(f"invalid {label} {value!r}: must be 1-64 bytes")
        result.append(x509.NameAttribute(oid, value))
    return x509.Name(result)


def _subject_alt_names(dns: Sequence[str], ips: Sequence[str], uris: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for value in dns:
        if not _DNS_RE.fullmatch(value) or len(value) > 253:
            raise PKIError(f"invalid --dns value {value!r}: not an ASCII DNS name")
        sans.append(x509.DNSName(value))
    for value in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError as exc:
            raise PKIError(f"invalid --ip value {value!r}: not an IPv4 or IPv6 address") from exc
    for value in uris:
        if not value.isascii() or not urlsplit(value).scheme or any(c.isspace() for c in value):
            raise PKIError(f"invalid --uri value {value!r}: expected an absolute ASCII URI")
        sans.append(x509.UniformResourceIdentifier(value))
    return list(dict.fromkeys(sans))


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_issuer_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _issuer_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise PKIError(f"unsupported CA key type {type(key).__name__}")
    return key


def _generate_key(key_type: str) -> PrivateKey:
    _check_key_type(key_type)
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP256R1())


def _key_type_of(key: PrivateKey) -> str:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"


def _key_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM; encrypted with *password* when given (cryptography's best available
    encryption: PBES2, AES-256-CBC, `-----BEGIN ENCRYPTED PRIVATE KEY-----`)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise PKIError(f"{path} already exists; use --force to replace it")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PKIError(f"{path} does not exist") from exc
    except OSError as exc:
        raise PKIError(f"cannot read {path}: {exc.strerror}") from exc


def _write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace *path*: write a sibling temp file created with *mode*, then rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise PKIError(f"cannot write {path}: {exc.strerror}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM certificate") from exc


def _require_ca_files(directory: Path, *names: str) -> None:
    missing = [str(directory / n) for n in names if not (directory / n).exists()]
    if missing:
        where = "" if directory.is_dir() else f" (directory {directory} does not exist)"
        raise PKIError(
            f"CA not initialised: {' and '.join(missing)} missing{where}; run 'tunnel ca init --dir {directory}' first"
        )


def _load_ca_cert(directory: Path) -> x509.Certificate:
    _require_ca_files(directory, CA_CRT)
    return _load_cert(directory / CA_CRT)


def _load_ca(directory: Path) -> tuple[x509.Certificate, PrivateKey]:
    _require_ca_files(directory, CA_KEY, CA_CRT)
    key_path = directory / CA_KEY
    cert = _load_cert(directory / CA_CRT)
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{key_path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, PrivateKey):
        raise PKIError(f"{key_path}: unsupported key type {type(key).__name__}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise PKIError(f"{key_path} does not match {directory / CA_CRT}")
    return cert, key


def _load_crl(directory: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    """The verified CRL, or None if the CA directory has none yet."""
    path = directory / CRL_FILE
    if not path.exists():
        return None
    try:
        crl = x509.load_pem_x509_crl(_read(path))
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM CRL") from exc
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(_issuer_key(ca_cert)):
        raise PKIError(f"{path} is not signed by the CA in {directory / CA_CRT}")
    return crl


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def _write_crl(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    entries: Sequence[x509.RevokedCertificate],
    *,
    number: int,
) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(_aki(ca_cert), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(directory / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM))


def _kind(cert: x509.Certificate) -> str:
    with contextlib.suppress(x509.ExtensionNotFound):
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "ca"
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return "unknown"
    if usages == {ExtendedKeyUsageOID.SERVER_AUTH}:
        return "server"
    if usages == {ExtendedKeyUsageOID.CLIENT_AUTH}:
        return "client"
    return "unknown"


def _format_san(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    return str(name)


def _describe_cert(cert: x509.Certificate, title: str = "Certificate") -> str:
    exts = cert.extensions
    try:
        sans = ", ".join(_format_san(n) for n in exts.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = "none"
    try:
        eku = ", ".join(
            _EKU_NAMES.get(oid, oid.dotted_string) for oid in exts.get_extension_for_class(x509.ExtendedKeyUsage).value
        )
    except x509.ExtensionNotFound:
        eku = "none"
    try:
        is_ca = exts.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    rows = [
        ("Subject", cert.subject.rfc4514_string()),
        ("Issuer", cert.issuer.rfc4514_string()),
        ("Serial", f"{cert.serial_number:x}"),
        ("Not before", f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"),
        ("Not after", f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"),
        ("SANs", sans),
        ("EKU", eku),
        ("CA", "yes" if is_ca else "no"),
        ("SHA-256", fingerprint(cert)),
    ]
    return _table(title, rows)


def _describe_crl(crl: x509.CertificateRevocationList) -> str:
    next_update = crl.next_update_utc
    rows = [
        ("Issuer", crl.issuer.rfc4514_string()),
        ("Last update", f"{crl.last_update_utc:%Y-%m-%d %H:%M:%S} UTC"),
        ("Next update", f"{next_update:%Y-%m-%d %H:%M:%S} UTC" if next_update else "none"),
        ("CRL number", str(_crl_number(crl))),
    ]
    revoked = [f"{entry.serial_number:x} ({entry.revocation_date_utc:%Y-%m-%d %H:%M:%S} UTC)" for entry in crl]
    rows.append(("Revoked", revoked[0] if revoked else "none"))
    rows.extend(("", line) for line in revoked[1:])
    return _table("Certificate revocation list", rows)


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"{title}:"]
    lines.extend(f"  {label + ':' if label else '':<{width}} {value}" for label, value in rows)
    return "\n".join(lines)
