"""Unit tests for tunnel.identity: what a certificate names, and whether an allow rule admits it."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunnel.identity import (
    AllowRule,
    Decision,
    Identity,
    decide,
    identity_from_certificate,
    identity_from_der,
    normalize_fingerprint,
    profile_refusal,
)

KEY = ec.generate_private_key(ec.SECP256R1())
NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2034, 1, 1, 12, 30, tzinfo=dt.UTC)


def make_cert(
    *,
    cn: str | None = None,
    ous: Sequence[str] = (),
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
    ips: Sequence[str] = (),
    serial: int = 1000,
    more_cns: Sequence[str] = (),
    ca: bool | None = None,
) -> tuple[x509.Certificate, bytes]:
    """A self-signed EC P-256 certificate with exactly the names asked for, and its DER:
    CN attributes `cn` then `more_cns`; basicConstraints only if `ca` is not None."""
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tunnel tests")]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    if cn is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    attributes += [x509.NameAttribute(NameOID.COMMON_NAME, more) for more in more_cns]
    name = x509.Name(attributes)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    general_names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    general_names += [x509.UniformResourceIdentifier(u) for u in uris]
    general_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    cert = builder.sign(KEY, hashes.SHA256())
    return cert, cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------- extraction


def test_identity_from_der_reads_every_name() -> None:
    _, der = make_cert(
        cn="app1",
        ous=["payments", "ops"],
        dns=["app1.internal", "app1.example.org"],
        uris=["spiffe://example.org/app1"],
        ips=["127.0.0.1", "::1"],
        serial=0xC0FFEE,
    )

    identity = identity_from_der(der)

    assert identity == Identity(
        cn="app1",
        dns=("app1.internal", "app1.example.org"),
        uri=("spiffe://example.org/app1",),
        ip=("127.0.0.1", "::1"),
        ou=("payments", "ops"),
        fingerprint=hashlib.sha256(der).hexdigest(),
        serial=0xC0FFEE,
        not_after=NOT_AFTER,
        cns=("app1",),
        ca=False,
    )
    assert identity.not_after.tzinfo is not None
    assert identity.describe() == "cn=app1"


def test_fingerprint_is_lowercase_sha256_of_der() -> None:
    _, der = make_cert(cn="x")
    fingerprint = identity_from_der(der).fingerprint
    assert fingerprint == hashlib.sha256(der).hexdigest()
    assert len(fingerprint) == 64
    assert fingerprint == fingerprint.lower()
    assert ":" not in fingerprint


def test_identity_from_certificate_without_der_matches_from_der() -> None:
    cert, der = make_cert(cn="app2", ous=["a"], dns=["b"], uris=["urn:c"], ips=["10.0.0.1"])
    assert identity_from_certificate(cert) == identity_from_der(der)
    assert identity_from_certificate(cert, der) == identity_from_der(der)


def test_identities_of_different_certificates_differ() -> None:
    _, first = make_cert(cn="same", serial=1)
    _, second = make_cert(cn="same", serial=2)
    one, two = identity_from_der(first), identity_from_der(second)
    assert one.fingerprint != two.fingerprint
    assert (one.serial, two.serial) == (1, 2)


def test_every_common_name_is_read_the_first_is_cn() -> None:
    cert, _ = make_cert(cn="first", more_cns=["second"])
    identity = identity_from_certificate(cert)
    assert identity.cn == "first"
    assert identity.cns == ("first", "second")


@pytest.mark.parametrize(("ca", "expected"), [(None, False), (False, False), (True, True)])
def test_basic_constraints_ca_is_read(ca: bool | None, expected: bool) -> None:
    cert, _ = make_cert(cn="x", ca=ca)
    assert identity_from_certificate(cert).ca is expected


# --------------------------------------------------------------------------- profile_refusal


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        pytest.param(make_cert(cn="app1"), None, id="one-cn"),
        pytest.param(make_cert(), None, id="no-cn"),
        pytest.param(make_cert(cn="app1", ca=False), None, id="ca-false"),
        pytest.param(make_cert(cn="app1", ca=True), "peer certificate is a CA", id="ca-true"),
        pytest.param(make_cert(cn="app1", more_cns=["admin"]), "ambiguous identity: 2 common names", id="two-cns"),
        pytest.param(make_cert(cn="a", more_cns=["a", "a"]), "ambiguous identity: 3 common names", id="same-cn-3x"),
        pytest.param(make_cert(cn="a", more_cns=["b"], ca=True), "peer certificate is a CA", id="ca-first"),
    ],
)
def test_profile_refusal(cert: tuple[x509.Certificate, bytes], reason: str | None) -> None:
    refusal = profile_refusal(identity_from_der(cert[1]))
    assert (refusal.text if refusal else None) == reason


def test_profile_refusal_is_whatever_the_allow_rule() -> None:
    """decide() would admit both; profile_refusal does not look at the rule at all."""
    two = identity_from_der(make_cert(cn="app1", more_cns=["admin"])[1])
    ca = identity_from_der(make_cert(cn="app1", ca=True)[1])
    for identity in (two, ca):
        assert decide(identity, AllowRule(any=True)).allowed
        assert decide(identity, AllowRule(cn=fs("app1"))).allowed
        assert profile_refusal(identity) is not None


def test_certificate_without_cn_or_san() -> None:
    _, der = make_cert()
    identity = identity_from_der(der)
    assert (identity.cn, identity.dns, identity.uri, identity.ip, identity.ou) == (None, (), (), (), ())
    assert identity.describe() == f"fingerprint={hashlib.sha256(der).hexdigest()[:16]}"


def test_identity_from_der_rejects_garbage() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's message is not ours to pin
        identity_from_der(b"not a certificate")


def _identity(
    cn: str | None = None,
    dns: tuple[str, ...] = (),
    uri: tuple[str, ...] = (),
    ip: tuple[str, ...] = (),
    ou: tuple[str, ...] = (),
    fingerprint: str = "0f" * 32,
) -> Identity:
    return Identity(cn=cn, dns=dns, uri=uri, ip=ip, ou=ou, fingerprint=fingerprint, serial=1, not_after=NOT_AFTER)


@pytest.mark.parametrize(
    ("identity", "label"),
    [
        (_identity(cn="app1", dns=("d",), uri=("u",)), "cn=app1"),
        (_identity(dns=("d1", "d2"), uri=("urn:u1", "urn:u2")), "uri=urn:u1"),
        (_identity(dns=("d1", "d2")), "dns=d1"),
        (_identity(cn="", dns=("d1",)), "dns=d1"),  # an empty CN is no CN
        (_identity(ip=("10.0.0.1",), ou=("ops",)), "fingerprint=0f0f0f0f0f0f0f0f"),
    ],
)
def test_describe(identity: Identity, label: str) -> None:
    assert identity.describe() == label


# --------------------------------------------------------------------------- fingerprints

FP = hashlib.sha256(b"some certificate").hexdigest()


@pytest.mark.parametrize(
    "text",
    [FP, FP.upper(), ":".join(FP[i : i + 2] for i in range(0, 64, 2)).upper(), f"  {FP.upper()}\n"],
    ids=["lower", "upper", "openssl-colons", "padded"],
)
def test_normalize_fingerprint(text: str) -> None:
    assert normalize_fingerprint(text) == FP


def test_allow_rule_normalizes_fingerprints() -> None:
    colons = ":".join(FP[i : i + 2] for i in range(0, 64, 2)).upper()
    rule = AllowRule(fingerprint=frozenset({colons, FP.upper(), FP}))
    assert rule.fingerprint == frozenset({FP})
    assert rule == AllowRule(fingerprint=frozenset({FP}))


def test_allow_rule_defaults_admit_nobody() -> None:
    rule = AllowRule()
    assert (rule.cn, rule.dns, rule.uri, rule.ou, rule.fingerprint, rule.any) == (
        frozenset(),
        frozenset(),
        frozenset(),
        frozenset(),
        frozenset(),
        False,
    )


# --------------------------------------------------------------------------- decide

_, DER = make_cert(
    cn="app1",
    ous=["payments"],
    dns=["app1.internal", "App1.Example.Org"],
    uris=["spiffe://example.org/app1"],
    ips=["10.1.2.3"],
)
ID = identity_from_der(DER)
ID_FP = hashlib.sha256(DER).hexdigest()
ID_FP_COLONS = ":".join(ID_FP[i : i + 2] for i in range(0, 64, 2))


def fs(*items: str) -> frozenset[str]:
    return frozenset(items)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param(AllowRule(any=True), Decision(True, "allow.any"), id="any"),
        pytest.param(AllowRule(any=True, cn=fs("someone-else")), Decision(True, "allow.any"), id="any-wins"),
        pytest.param(AllowRule(cn=fs("app1")), Decision(True, "allow.cn matched app1"), id="cn"),
        pytest.param(
            AllowRule(dns=fs("app1.internal")), Decision(True, "allow.dns matched app1.internal"), id="dns-first"
        ),
        pytest.param(
            AllowRule(dns=fs("App1.Example.Org")),
            Decision(True, "allow.dns matched App1.Example.Org"),
            id="dns-second",
        ),
        pytest.param(
            AllowRule(dns=fs("APP1.INTERNAL")),
            Decision(True, "allow.dns matched app1.internal"),
            id="dns-any-case",  # DNS names are case-insensitive
        ),
        pytest.param(
            AllowRule(dns=fs("app1.example.org")),
            Decision(True, "allow.dns matched App1.Example.Org"),
            id="dns-any-case-in-cert",
        ),
        pytest.param(
            AllowRule(uri=fs("spiffe://example.org/app1")),
            Decision(True, "allow.uri matched spiffe://example.org/app1"),
            id="uri",
        ),
        pytest.param(AllowRule(ou=fs("payments")), Decision(True, "allow.ou matched payments"), id="ou"),
        pytest.param(AllowRule(fingerprint=fs(ID_FP)), Decision(True, "allow.fingerprint matched"), id="fingerprint"),
        pytest.param(
            AllowRule(fingerprint=fs(ID_FP.upper())),
            Decision(True, "allow.fingerprint matched"),
            id="fingerprint-upper",
        ),
        pytest.param(
            AllowRule(fingerprint=fs(ID_FP_COLONS.upper())),
            Decision(True, "allow.fingerprint matched"),
            id="fingerprint-colons",
        ),
        pytest.param(
            AllowRule(cn=fs("nobody"), ou=fs("payments")),
            Decision(True, "allow.ou matched payments"),
            id="one-match-of-several-lists",
        ),
        pytest.param(
            AllowRule(cn=fs("app2"), dns=fs("app2.internal")),
            Decision(False, "not allowed: matches none of allow.cn, allow.dns", "not allowed"),
            id="no-match-names-lists-in-use",
        ),
        pytest.param(
            AllowRule(uri=fs("spiffe://example.org/app2"), fingerprint=fs("00" * 32)),
            Decision(False, "not allowed: matches none of allow.uri, allow.fingerprint", "not allowed"),
            id="no-match-uri-fingerprint",
        ),
        pytest.param(
            AllowRule(cn=fs("a"), dns=fs("b"), uri=fs("c"), ou=fs("d"), fingerprint=fs("e")),
            Decision(
                False,
                "not allowed: matches none of allow.cn, allow.dns, allow.uri, allow.ou, allow.fingerprint",
                "not allowed",
            ),
            id="no-match-every-list",
        ),
        pytest.param(
            AllowRule(),
            Decision(False, "not allowed: matches none of an empty allow", "not allowed"),
            id="empty-admits-nobody",
        ),
        pytest.param(
            AllowRule(any=False),
            Decision(False, "not allowed: matches none of an empty allow", "not allowed"),
            id="any-false",
        ),
        # Lists are matched only against their own kind of name.
        pytest.param(
            AllowRule(dns=fs("app1")),
            Decision(False, "not allowed: matches none of allow.dns", "not allowed"),
            id="cn-not-dns",
        ),
        pytest.param(
            AllowRule(cn=fs("app1.internal")),
            Decision(False, "not allowed: matches none of allow.cn", "not allowed"),
            id="dns-not-cn",
        ),
        pytest.param(
            AllowRule(dns=fs("10.1.2.3")),
            Decision(False, "not allowed: matches none of allow.dns", "not allowed"),
            id="ip-not-dns",
        ),
        pytest.param(
            AllowRule(dns=fs("spiffe://example.org/app1"), cn=fs("payments"), ou=fs("app1"), uri=fs(ID_FP)),
            Decision(False, "not allowed: matches none of allow.cn, allow.dns, allow.uri, allow.ou", "not allowed"),
            id="each-name-only-in-its-own-list",
        ),
        pytest.param(
            AllowRule(cn=fs("App1")),
            Decision(False, "not allowed: matches none of allow.cn", "not allowed"),
            id="cn-exact-case",
        ),
        pytest.param(
            AllowRule(uri=fs("spiffe://example.org/app1/")),
            Decision(False, "not allowed: matches none of allow.uri", "not allowed"),
            id="uri-exact",
        ),
        pytest.param(
            AllowRule(dns=fs("*.internal")),
            Decision(False, "not allowed: matches none of allow.dns", "not allowed"),
            id="no-wildcards",
        ),
    ],
)
def test_decide(rule: AllowRule, expected: Decision) -> None:
    assert decide(ID, rule) == expected


def test_decide_without_cn_does_not_match_empty_cn() -> None:
    anonymous = identity_from_der(make_cert()[1])
    assert not decide(anonymous, AllowRule(cn=fs(""))).allowed
    assert decide(anonymous, AllowRule(fingerprint=fs(anonymous.fingerprint.upper()))).allowed


def test_decide_checks_every_ou_and_san() -> None:
    identity = _identity(ou=("a", "b", "c"), uri=("urn:1", "urn:2"))
    assert decide(identity, AllowRule(ou=fs("c"))) == Decision(True, "allow.ou matched c")
    assert decide(identity, AllowRule(uri=fs("urn:2"))) == Decision(True, "allow.uri matched urn:2")


# --------------------------------------------------------------------------- bounds


def named(**names: object) -> Identity:
    fields: dict[str, object] = {"cn": None, "dns": (), "uri": (), "ip": (), "ou": ()}
    fields.update(names)
    return Identity(**fields, fingerprint="ab" * 32, serial=1, not_after=NOT_AFTER)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("identity", "size"),
    [
        (named(cn="a" * 70_000), 70_000),
        (named(cn="app1", ou=("payments", "x" * 1025)), 1025),
        (named(uri=("spiffe://example.org/" + "u" * 2000,)), 2021),
        (named(dns=("é" * 513,)), 1026),  # bytes (UTF-8), not characters
    ],
)
def test_an_identity_with_a_name_over_1_KiB_is_refused_whatever_the_rule(identity: Identity, size: int) -> None:
    for rule in (AllowRule(any=True), AllowRule(cn=frozenset({"app1"}), ou=frozenset({"payments"}))):
        assert decide(identity, rule) == Decision(False, f"identity too long ({size} bytes)", "identity too long")


def test_a_name_of_exactly_1_KiB_is_judged_by_the_rule() -> None:
    assert decide(named(cn="a" * 1024), AllowRule(any=True)).allowed
    assert decide(named(cn="a" * 1024), AllowRule(cn=frozenset({"a" * 1024}))).allowed


def test_describe_cuts_a_name_over_1_KiB_to_its_start_and_size() -> None:
    assert named(cn="a" * 70_000).describe() == "cn=" + "a" * 64 + "... (70000 bytes)"
    assert named(uri=("u" * 1024,)).describe() == "uri=" + "u" * 1024
