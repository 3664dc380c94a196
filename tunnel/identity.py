"""Who a peer certificate names, and whether an allow rule admits it.

Pure functions over `cryptography` certificates: no sockets, no trio.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from tunnel.outcomes import PEER_IS_A_CA, Outcome, refusal


@dataclass(frozen=True)
class Identity:
    """What a certificate says about its holder, in the terms `allow:` uses."""

    cn: str | None
    dns: tuple[str, ...]
    uri: tuple[str, ...]
    ip: tuple[str, ...]
    ou: tuple[str, ...]
    fingerprint: str  # sha256 of the DER certificate, lowercase hex, no colons
    serial: int
    not_after: datetime
    cns: tuple[str, ...] = ()  # every CN attribute of the subject, in order (`cn` is the first)
    ca: bool = False  # basicConstraints CA:TRUE

    def describe(self) -> str:
        """A short label for log lines: the CN if there is one, else a SAN, else the hash.
        A value over MAX_FIELD_BYTES is cut to its first 64 characters and its size:
        `cn=aaaa...aaaa... (70000 bytes)`."""
        if self.cn:
            return f"cn={_label(self.cn)}"
        if self.uri:
            return f"uri={_label(self.uri[0])}"
        if self.dns:
            return f"dns={_label(self.dns[0])}"
        return f"fingerprint={self.fingerprint[:16]}"

    @functools.cached_property
    def longest_field(self) -> int:
        """The size in bytes (UTF-8) of the longest name it holds: CN, SAN or OU (worked
        out once: identities are cached per certificate)."""
        values = [self.cn or "", *self.dns, *self.uri, *self.ip, *self.ou]
        return max(len(value.encode("utf-8", "surrogatepass")) for value in values)


# No name in a certificate we admit is longer than this many bytes (UTF-8). X.509's own
# upper bound for a CN is 64 characters (RFC 5280 appendix A, ub-common-name); a DNS name
# is at most 253; a URI has no bound, hence the room. Past it an identity is refused
# before anything else: a name that long is an attack on whatever reads it next (log
# lines, a PROXY v2 header's 64 KiB TLV).
MAX_FIELD_BYTES = 1024


def _label(value: str) -> str:
    size = len(value.encode("utf-8", "surrogatepass"))
    return value if size <= MAX_FIELD_BYTES else f"{value[:64]}... ({size} bytes)"


def normalize_fingerprint(text: str) -> str:
    """`AB:CD:..` or `abcd..` → `abcd..`; used for both config values and certificates."""
    return text.replace(":", "").strip().lower()


@functools.lru_cache(maxsize=4096)
def identity_from_der(der: bytes) -> Identity:
    """Read the identity out of a DER certificate. Cached: the same clients come back, and
    parsing a certificate costs more than the rest of accepting a connection."""
    cert = x509.load_der_x509_certificate(der)
    return identity_from_certificate(cert, der)


def identity_from_certificate(cert: x509.Certificate, der: bytes | None = None) -> Identity:
    """Read the identity out of a parsed certificate."""
    if der is None:
        from cryptography.hazmat.primitives.serialization import Encoding

        der = cert.public_bytes(Encoding.DER)
    cns = _attribute_strings(cert.subject, NameOID.COMMON_NAME)
    ous = _attribute_strings(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    dns: list[str] = []
    uri: list[str] = []
    ip: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        dns = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        uri = [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
        ip = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    return Identity(
        cn=cns[0] if cns else None,
        dns=tuple(dns),
        uri=tuple(uri),
        ip=tuple(ip),
        ou=tuple(ous),
        fingerprint=hashlib.sha256(der).hexdigest(),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        cns=tuple(cns),
        ca=ca,
    )


def profile_refusal(identity: Identity) -> Outcome | None:
    """Why a peer's certificate is refused whatever `allow` says, or None: the same in
    both modes (a client's certificate, a server's). A CA certificate (basicConstraints
    CA:TRUE, RFC 5280 section 4.2.1.9) is for signing certificates, not for a peer to
    present. A subject with several CN attributes names no one identity: tools disagree
    on which is meant (OpenSSL-based ones and this tunnel read the first, Go's crypto/x509
    the last), so a rule written against one reading could admit the other's."""
    if identity.ca:
        return PEER_IS_A_CA
    if len(identity.cns) > 1:
        return refusal("ambiguous identity", f"{len(identity.cns)} common names")
    return None


def _attribute_strings(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    values = []
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value
        values.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return values


@dataclass(frozen=True)
class AllowRule:
    """Server-mode access list: any one match admits. Empty means nobody, unless `any`."""

    cn: frozenset[str] = field(default_factory=frozenset)
    dns: frozenset[str] = field(default_factory=frozenset)
    uri: frozenset[str] = field(default_factory=frozenset)
    ou: frozenset[str] = field(default_factory=frozenset)
    fingerprint: frozenset[str] = field(default_factory=frozenset)
    any: bool = False

    def __post_init__(self) -> None:
        normalized = frozenset(normalize_fingerprint(f) for f in self.fingerprint)
        object.__setattr__(self, "fingerprint", normalized)
        # DNS names are case-insensitive (RFC 4343): compared lower-cased, folded once here.
        object.__setattr__(self, "dns", frozenset(name.lower() for name in self.dns))


@dataclass(frozen=True)
class Decision:
    """The outcome of checking an identity against an allow rule, with the reason why."""

    allowed: bool
    reason: str
    label: str = ""  # a refusal's metric label (outcomes.Outcome), chosen here

    @property
    def refusal(self) -> Outcome:
        """The refusal, as an outcome (only for a decision that refuses)."""
        return Outcome(self.label, self.reason)


def decide(identity: Identity, rule: AllowRule) -> Decision:
    """Admit the identity if any one of the rule's lists matches it. Every comparison is
    of whole strings, a `*` being no wildcard on either side: `cn` with the subject's CN,
    case-sensitive; `dns` with each DNS subjectAltName, ignoring ASCII case (RFC 4343);
    `uri` with each URI subjectAltName, case-sensitive; `ou` with each OU attribute of the
    subject, case-sensitive; `fingerprint` with the SHA-256 of the whole DER certificate.
    IP address subjectAltNames are matched by nothing. `profile_refusal` comes first.
    An identity with a name over MAX_FIELD_BYTES is refused whatever the rule
    (`identity too long (N bytes)`, N the longest name's size), allow.any included."""
    longest = identity.longest_field
    if longest > MAX_FIELD_BYTES:
        return Decision(False, f"identity too long ({longest} bytes)", "identity too long")
    if rule.any:
        return Decision(True, "allow.any")
    if identity.cn is not None and identity.cn in rule.cn:
        return Decision(True, f"allow.cn matched {identity.cn}")
    for dns in identity.dns:
        if dns.lower() in rule.dns:
            return Decision(True, f"allow.dns matched {dns}")
    for uri in identity.uri:
        if uri in rule.uri:
            return Decision(True, f"allow.uri matched {uri}")
    for ou in identity.ou:
        if ou in rule.ou:
            return Decision(True, f"allow.ou matched {ou}")
    if identity.fingerprint in rule.fingerprint:
        return Decision(True, "allow.fingerprint matched")
    used = [f"allow.{key}" for key in ("cn", "dns", "uri", "ou", "fingerprint") if getattr(rule, key)]
    return Decision(False, "not allowed: matches none of " + (", ".join(used) or "an empty allow"), "not allowed")
