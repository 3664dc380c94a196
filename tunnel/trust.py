"""What a tunnel trusts, parsed: its anchors, intermediate CAs and CRLs; and the checks
OpenSSL makes in a full handshake that the tunnel must be able to make again itself.

OpenSSL verifies a peer's chain only during a full handshake. Three moments come without
one, and each must reach the same verdict a full handshake would:

* `tunnel check` and every start or reload: the tunnel's own certificate must have a path
  to an anchor in `tls.ca`, through the intermediates after the leaf in `tls.cert` or in
  the `tls.ca` bundle (the two layouts step-ca, Vault and cert-manager write).
* a reload, for every open connection: the chain its peer presented must still have a path
  to the new anchors, with no certificate on it revoked, and the CRLs must be current.
* a resumed session (TLS 1.2 or 1.3), which skips certificate verification entirely: the
  verdict of the session's full handshake holds only until the earliest notAfter on its
  path or the CRLs' next update, whichever comes first (`PeerRecords`); a session from a
  ticket whose full handshake this process never saw resumes only if its leaf alone has
  a path (`PeerRecords.resumable`), else it makes a full handshake.

Path building is `cryptography.x509.verification` (RFC 5280 chain building), not a
hand-written signature walk. Its extension policy is the Web PKI one for CA certificates
(basicConstraints CA:TRUE, keyCertSign, as OpenSSL's strict mode wants) and permissive for
the leaf: a leaf's role and names are judged by the handshake and the `allow` rules, and a
client certificate need not carry a subjectAltName.

Anchors are the self-signed certificates of `tls.ca`; its other certificates are
intermediates, as OpenSSL treats them (a bundle holding only an intermediate has no
anchor: OpenSSL would refuse every peer, so `check` refuses it). When `tls.crl` is set,
revocation is checked for every certificate of a path, the anchor included, as OpenSSL's
X509_V_FLAG_CRL_CHECK_ALL does (and stunnel and HAProxy set): each CA on a path needs its
CRL, and a revoked intermediate refuses every leaf under it.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PSS, PKCS1v15
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from tunnel.config import ConfigError, TLSConfig, TunnelConfig
from tunnel.identity import identity_from_certificate, profile_refusal
from tunnel.outcomes import (
    CERTIFICATE_EXPIRED,
    CERTIFICATE_NOT_YET_VALID,
    CRL_EXPIRED,
    CRL_UNAVAILABLE,
    REVOKED,
    Outcome,
    refusal,
)


class PathError(Exception):
    """No acceptable path from a certificate to an anchor; `outcome` says why."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


@dataclass(frozen=True)
class Certificates:
    """A tunnel's own certificate (with the intermediates after it in tls.cert) and the
    certificates of its CA file, parsed once."""

    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the rest of tls.cert: intermediates, leaf first
    cas: tuple[x509.Certificate, ...]

    def expiries(self, tls: TLSConfig) -> list[tuple[Path, datetime]]:
        """(file, notAfter) for the certificate (its chain's earliest) and the CA file."""
        return [
            (tls.cert, min(c.not_valid_after_utc for c in (self.cert, *self.chain))),
            (tls.ca, min(ca.not_valid_after_utc for ca in self.cas)),
        ]


@dataclass(frozen=True)
class RevocationList:
    """One parsed CRL: who signed it, which serials it revokes, when it goes stale."""

    path: Path
    crl: x509.CertificateRevocationList
    signer: x509.Certificate  # the CA whose signature on it was verified when it was loaded
    revoked: frozenset[int]
    next_update: datetime
    fingerprint: bytes = b""  # SHA-256 of its DER: which CRL this is (ticket_keys.trust_scope)

    def is_from(self, ca: x509.Certificate) -> bool:
        """Whether this is `ca`'s CRL: same name and same key as the CA that signed it
        (compared, not verified again: a CRL of 5 MB takes milliseconds to hash)."""
        return self.signer.subject == ca.subject and self.signer.public_key() == ca.public_key()


@dataclass(frozen=True)
class Trust:
    """The parsed trust material of a tunnel: what the handshake checks peers against."""

    anchors: tuple[x509.Certificate, ...]  # the self-signed certificates in tls.ca
    intermediates: tuple[x509.Certificate, ...]  # the other certificates in tls.ca
    crls: tuple[RevocationList, ...] = ()

    @classmethod
    def of(cls, cas: Sequence[x509.Certificate], crls: tuple[RevocationList, ...] = ()) -> Trust:
        """Trust in a CA bundle: its self-signed certificates anchor, the rest are intermediates."""
        anchors = tuple(c for c in cas if _self_signed(c))
        return cls(anchors=anchors, intermediates=tuple(c for c in cas if c not in anchors), crls=crls)

    @property
    def revoked(self) -> frozenset[int]:
        """Every serial number the CRLs revoke (whichever CA's)."""
        return frozenset().union(*(c.revoked for c in self.crls))

    @property
    def crl_next_update(self) -> datetime | None:
        """When the first of the CRLs goes stale (None without CRLs)."""
        return min((c.next_update for c in self.crls), default=None)

    def path(
        self, leaf: x509.Certificate, presented: Sequence[x509.Certificate], now: datetime
    ) -> list[x509.Certificate]:
        """The path from `leaf` to an anchor, leaf first, anchor last, through the
        `presented` intermediates and those of tls.ca. PathError says why there is none:
        the leaf's dates, or no path (an unknown CA, an expired or missing intermediate)."""
        if leaf.not_valid_after_utc <= now:
            raise PathError(CERTIFICATE_EXPIRED)
        if leaf.not_valid_before_utc > now:
            raise PathError(CERTIFICATE_NOT_YET_VALID)
        if not self.anchors:
            raise PathError(refusal("unknown CA", "(no self-signed CA certificate in tls.ca to anchor a path)"))
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(list(self.anchors)))
            .time(now)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=verification.ExtensionPolicy.permit_all(),
            )
        )
        try:
            verified = builder.build_client_verifier().verify(leaf, [*presented, *self.intermediates])
        except verification.VerificationError as exc:
            raise PathError(refusal("unknown CA", f"(no path to an anchor in tls.ca: {exc})")) from None
        return list(verified.chain)

    def revocation(self, path: Sequence[x509.Certificate], now: datetime) -> Outcome | None:
        """Why a path is not acceptable under the CRLs ("revoked", "CRL expired", "CRL
        unavailable"), or None. Every certificate is checked, the anchor included, against
        the CRL of its issuer (X509_V_FLAG_CRL_CHECK_ALL)."""
        if not self.crls:
            return None
        if any(c.next_update <= now for c in self.crls):
            return CRL_EXPIRED
        for index, cert in enumerate(path):
            issuer = path[min(index + 1, len(path) - 1)]
            crl = self._crl_of(issuer)
            if crl is None:
                return CRL_UNAVAILABLE
            if cert.serial_number in crl.revoked:
                return REVOKED if index == 0 else refusal("revoked", f"(its CA {cert.subject.rfc4514_string()})")
        return None

    def refusal(self, chain_der: Sequence[bytes], now: datetime) -> Outcome | None:
        """Why a peer's presented chain (leaf first, DER) would be refused by a full
        handshake under this trust now, or None if it would pass."""
        leaf, *rest = (x509.load_der_x509_certificate(der) for der in chain_der)
        try:
            path = self.path(leaf, rest, now)
        except PathError as exc:
            return exc.outcome
        return self.revocation(path, now)

    def _crl_of(self, issuer: x509.Certificate) -> RevocationList | None:
        return next((crl for crl in self.crls if crl.is_from(issuer)), None)


def load_certificates(config: TunnelConfig) -> Certificates:
    """Parse tls.cert (leaf, then any intermediates) and tls.ca (ConfigError naming the
    key if either holds no PEM certificate)."""
    tls = config.tls
    cert, *chain = _load_certificates(config.source, "tls.cert", tls.cert)
    return Certificates(cert, tuple(chain), tuple(_load_certificates(config.source, "tls.ca", tls.ca)))


def load_trust(config: TunnelConfig, certificates: Certificates | None = None, *, now: datetime | None = None) -> Trust:
    """Split tls.ca into anchors and intermediates and parse every tls.crl file. A CRL
    that does not parse, is signed by no CA in tls.ca or the tls.cert chain, or is past
    its next update is a ConfigError, as is a CA in tls.ca that has no CRL when CRLs are
    set (OpenSSL would then refuse every peer under it): never a silent allow. Reads the
    certificates unless given them parsed."""
    tls = config.tls
    now = now or datetime.now(UTC)
    certificates = certificates or load_certificates(config)
    trust = Trust.of(certificates.cas)
    if not trust.anchors:
        raise ConfigError(
            config.source,
            "tls.ca",
            f"{tls.ca} has no self-signed (root) CA certificate: add the root that the intermediates in it chain to",
        )
    if not tls.crl:
        return trust
    signers = [*certificates.cas, *certificates.chain]
    crls = tuple(_load_crl(config, path, signers, now) for path in tls.crl)
    trust = Trust.of(certificates.cas, crls)
    for ca in certificates.cas:
        if trust._crl_of(ca) is None:
            raise ConfigError(
                config.source,
                "tls.crl",
                f"no CRL from the CA {ca.subject.rfc4514_string()!r} in {tls.ca}: with tls.crl set, every CA "
                "a peer's chain passes through needs its CRL (name one file per CA)",
            )
    return trust


def _load_crl(config: TunnelConfig, path: Path, signers: Sequence[x509.Certificate], now: datetime) -> RevocationList:
    source = config.source
    try:
        crl, der = _load_pem_crl(path.read_bytes())  # PEM only: OpenSSL's file lookup reads no DER CRL
    except (ValueError, OSError) as exc:
        raise ConfigError(source, "tls.crl", f"no PEM CRL in {path}: {exc}") from None
    signer = next((ca for ca in signers if ca.subject == crl.issuer and _crl_signed_by(crl, der, ca)), None)
    if signer is None:
        raise ConfigError(
            source,
            "tls.crl",
            f"{path} is not signed by a CA in {config.tls.ca} or the chain in {config.tls.cert} "
            f"(its issuer: {crl.issuer.rfc4514_string()!r})",
        )
    next_update = crl.next_update_utc
    if next_update is None:
        raise ConfigError(source, "tls.crl", f"{path} has no next update time")
    if next_update <= now:
        raise ConfigError(
            source,
            "tls.crl",
            f"{path} is out of date: its next update was due {_when(next_update)}, and it is now "
            f"{_when(now)} (refresh it, e.g. with tunnel ca crl)",
        )
    return RevocationList(
        path=path,
        crl=crl,
        signer=signer,
        revoked=frozenset(entry.serial_number for entry in crl),
        next_update=next_update,
        fingerprint=hashlib.sha256(der).digest(),
    )


def _when(moment: datetime) -> str:
    """A timestamp for error messages: full date and time, seconds, UTC."""
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


EXPIRY_WARNING = timedelta(days=30)


def check_certificates(
    config: TunnelConfig, *, now: datetime | None = None, certificates: Certificates | None = None
) -> list[str]:
    """What `tunnel check` adds to building the context: the tunnel's certificate is one a
    peer tunnel accepts (not a CA, one CN: identity.profile_refusal), has a
    path to an anchor in tls.ca (through the intermediates after it in tls.cert or in
    tls.ca) and everything on it is in date. ConfigError naming tls.cert when not, with
    full timestamps; warnings for what expires within EXPIRY_WARNING. Reads the files
    unless given them parsed."""
    now = now or datetime.now(UTC)
    tls = config.tls
    certificates = certificates or load_certificates(config)
    _check_own_path(config, certificates, now)
    _check_own_role(config, certificates.cert)
    warnings = []
    dated = [("tls.cert", tls.cert, c) for c in (certificates.cert, *certificates.chain)]
    dated += [("tls.ca", tls.ca, c) for c in certificates.cas]
    for key, path, certificate in dated:
        not_after = certificate.not_valid_after_utc
        if not_after <= now:
            name = certificate.subject.rfc4514_string()
            raise ConfigError(config.source, key, f"{path}: {name!r} expired at {_when(not_after)} (now {_when(now)})")
        left = not_after - now
        renewing = tls.renew is not None and certificate is certificates.cert
        if left < EXPIRY_WARNING and not renewing:  # tls.renew reports its own failures
            warnings.append(f"{config.source}: {key}: {path} expires in {left.days} days ({_when(not_after)})")
    return warnings


_ROLE_USAGE = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
_ROLE_FLAG = {"server": "--server", "client": "--client"}


def _check_own_role(config: TunnelConfig, cert: x509.Certificate) -> None:
    """The tunnel's certificate must be usable for its side of TLS (RFC 5280 4.2.1.12 and
    4.2.1.3): a server tunnel presents it as a TLS server, a client tunnel as a TLS client,
    and the peer refuses it otherwise ("unsupported certificate purpose")."""
    role = config.mode
    where = f"{config.tls.cert}"
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = None
    wanted = _ROLE_USAGE[role]
    if usages is not None and wanted not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        names = ", ".join(getattr(u, "_name", u.dotted_string) for u in usages) or "none"
        raise ConfigError(
            config.source,
            "tls.cert",
            f"{where} may not be used by a TLS {role} (extendedKeyUsage: {names}), and a {role} tunnel "
            f"presents it as one: its peers would refuse it. Use a certificate for {wanted._name}, "
            f"e.g. tunnel ca issue ... {_ROLE_FLAG[role]}",
        )
    try:
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not key_usage.digital_signature:
        raise ConfigError(
            config.source,
            "tls.cert",
            f"{where} has no digitalSignature in its keyUsage: it cannot sign a TLS handshake",
        )


def _check_own_path(config: TunnelConfig, certificates: Certificates, now: datetime) -> None:
    tls = config.tls
    trust = Trust.of(certificates.cas)
    cert = certificates.cert
    if cert.not_valid_after_utc <= now:
        raise ConfigError(
            config.source, "tls.cert", f"{tls.cert} expired at {_when(cert.not_valid_after_utc)} (now {_when(now)})"
        )
    if cert.not_valid_before_utc > now:
        raise ConfigError(
            config.source,
            "tls.cert",
            f"{tls.cert} is not valid before {_when(cert.not_valid_before_utc)} (now {_when(now)}; "
            "is the issuer's clock or this one wrong?)",
        )
    why = profile_refusal(identity_from_certificate(cert))
    if why is not None:  # what a peer tunnel checks of it (identity.profile_refusal), told now
        raise ConfigError(
            config.source,
            "tls.cert",
            f"{tls.cert}: {why}: a peer tunnel would refuse every connection with it. Use a "
            "leaf certificate (basicConstraints CA:FALSE, one CN), as `tunnel ca issue` makes",
        )
    try:
        trust.path(cert, certificates.chain, now)
    except PathError as exc:
        raise ConfigError(
            config.source,
            "tls.cert",
            f"{tls.cert} does not chain to a CA in {tls.ca}: {exc}. Put the intermediates after the "
            "certificate in tls.cert, or in the tls.ca bundle",
        ) from None


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_pem_crl(data: bytes) -> tuple[x509.CertificateRevocationList, bytes]:
    """(the CRL, its DER) from the first X509 CRL block of a PEM file; ValueError if none.

    Decoded with binascii and parsed as DER rather than by `load_pem_x509_crl`, which holds
    the GIL for the whole file (some 35 ms for 5 MB): a reload runs in a worker thread,
    and the event loop must keep relaying meanwhile."""
    begin, end = b"-----BEGIN X509 CRL-----", b"-----END X509 CRL-----"
    start = data.find(begin)
    stop = data.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError("no -----BEGIN X509 CRL----- block")
    try:
        der = base64.b64decode(b"".join(data[start + len(begin) : stop].split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in the PEM block: {exc}") from None
    return x509.load_der_x509_crl(der), der


def _first_element(der: bytes) -> bytes:
    """The first element (with its header) inside the outer DER SEQUENCE: a CRL's signed
    part, tbsCertList (RFC 5280 5.1). Only lengths are read; a wrong slice could only make
    the signature check fail, never pass."""

    def header(at: int) -> tuple[int, int]:  # (where the content starts, its length)
        if der[at] != 0x30:
            raise ValueError("not a DER SEQUENCE")
        first = der[at + 1]
        if first < 0x80:
            return at + 2, first
        count = first & 0x7F
        return at + 2 + count, int.from_bytes(der[at + 2 : at + 2 + count], "big")

    inner, _ = header(0)
    content, length = header(inner)
    return der[inner : content + length]


def _crl_signed_by(crl: x509.CertificateRevocationList, der: bytes, ca: x509.Certificate) -> bool:
    """Whether `ca` signed `crl` (given with its DER). For EC and RSA keys the signed part
    is sliced from the DER and hashed with hashlib, which lets go of the GIL on large
    inputs, and the signature is checked over that digest (cryptography's Prehashed):
    `is_signature_valid` re-encodes and hashes a CRL of 5 MB while holding the GIL for
    some 50 ms, which would stall the event loop during a reload even from a worker
    thread. Other keys take `is_signature_valid`."""
    key = ca.public_key()
    algorithm = crl.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) and algorithm is not None:
            digest = hashlib.new(algorithm.name, _first_element(der)).digest()
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(crl.signature, digest, ec.ECDSA(Prehashed(algorithm)))
            else:
                padding = crl.signature_algorithm_parameters
                if not isinstance(padding, PKCS1v15 | PSS):
                    return False
                key.verify(crl.signature, digest, padding, Prehashed(algorithm))
            return True
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    except (InvalidSignature, TypeError, ValueError, IndexError):
        return False


def _load_certificates(source: Path, key: str, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise ConfigError(source, key, f"no PEM certificate in {path}: {exc}") from None


@dataclass(frozen=True)
class PeerRecord:
    """What a peer's full handshake established: the chain it presented (DER, leaf
    first) and until when that verdict holds (earliest notAfter on its path, or the CRLs'
    next update)."""

    chain: tuple[bytes, ...]
    valid_until: datetime


class PeerRecords:
    """The verdicts of full handshakes under one state, for the resumptions that follow.

    Mutable by design and owned by one `TunnelState`: a reload makes a new state, a new
    SSL context and new records together. Bounded: the oldest record goes first. A
    session ticket may come from another process (a worker, the process before a
    hand-over) that made the full handshake: `resumable` judges, during the handshake,
    whether one can resume here at all; a resumption whose record is gone is checked from
    scratch.
    """

    LIMIT = 4096

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self._records: collections.OrderedDict[bytes, PeerRecord] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def chain(self, leaf_der: bytes) -> tuple[bytes, ...]:
        """The chain last presented with this leaf, or just the leaf if none is known."""
        record = self._records.get(leaf_der)
        return record.chain if record is not None else (leaf_der,)

    def knows(self, leaf_der: bytes) -> bool:
        """Whether a full handshake's verdict on this leaf is remembered already."""
        return leaf_der in self._records

    def remember(self, presented: Sequence[bytes], verified: Sequence[bytes]) -> None:
        """After a full handshake: the chain the peer presented and the path OpenSSL
        verified (leaf first, anchor last), both DER."""
        if not presented or presented[0] in self._records:
            return
        ends = [x509.load_der_x509_certificate(der).not_valid_after_utc for der in verified or presented]
        if self.trust.crl_next_update is not None:
            ends.append(self.trust.crl_next_update)
        self._records[presented[0]] = PeerRecord(tuple(presented), min(ends))
        if len(self._records) > self.LIMIT:
            self._records.popitem(last=False)

    def resumable(self, leaf_der: bytes, now: datetime) -> bool:
        """Whether a session with this leaf, back in a session ticket, may resume here:
        this process remembers a full handshake's verdict on it, or can build a path from
        the leaf alone (with tls.ca's intermediates) to an anchor. False when it can do
        neither: the client may have presented intermediates that tls.ca lacks, in a full
        handshake with another process, and judged from the leaf alone it would be refused
        where a full handshake admits it; a full handshake must judge it instead. A
        verdict found so (a path, nothing on it revoked) is remembered as a full
        handshake's would be; any other refusal (expired, revoked) is left to
        `resumption_refusal` after the handshake, which says why."""
        if leaf_der in self._records:
            return True
        try:
            path = self.trust.path(x509.load_der_x509_certificate(leaf_der), (), now)
        except PathError as exc:
            return exc.outcome.label != "unknown CA"
        except ValueError:  # not a certificate we can parse: let a full handshake judge it
            return False
        if self.trust.revocation(path, now) is None:
            ends = [c.not_valid_after_utc for c in path]
            if self.trust.crl_next_update is not None:
                ends.append(self.trust.crl_next_update)
            self._records[leaf_der] = PeerRecord((leaf_der,), min(ends))
            if len(self._records) > self.LIMIT:
                self._records.popitem(last=False)
        return True

    def resumption_refusal(self, leaf_der: bytes, now: datetime) -> Outcome | None:
        """Why a resumed session with this leaf must be refused now, or None: what a full
        handshake would say once its verdict has lapsed (or was never recorded)."""
        record = self._records.get(leaf_der)
        if record is not None and now < record.valid_until:
            return None
        return self.trust.refusal(record.chain if record is not None else (leaf_der,), now)
