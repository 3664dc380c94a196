"""TLS policy (tunnel.tls): certificate and CRL checks, and what `build_context` lets through.

The policy tests run real handshakes between two `ssl.SSLObject`s joined by memory BIOs: no
sockets, no event loop. Each refusal has a control next to it (a permissive peer that does
complete the same handshake) so that a test cannot pass merely because the probe is broken.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helpers import (
    PKI,
    client_doc,
    issue_dated,
    make_pki,
    server_doc,
    write_crl,
    write_padded_chain,
    write_yaml,
)
from tunnel import pki
from tunnel.config import ConfigError, TunnelConfig, load_file
from tunnel.openssl import SSL_CTRL_GET_CHAIN_CERTS, libssl, ssl_ctx_pointer
from tunnel.streams import _chain_der
from tunnel.tls import build_context
from tunnel.trust import EXPIRY_WARNING, Trust, check_certificates, load_trust

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
X509_V_ERR_CERT_REVOKED = 23
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64

# -- certificates and CRLs that pki cannot make --------------------------------------------


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


# -- tunnel configurations -------------------------------------------------------------------


@pytest.fixture
def p(tmp_path: Path) -> PKI:
    """A fresh CA per test (these tests revoke and overwrite files). NOW is taken afresh
    with it: paths are built as of NOW, and the CA is valid from 5 minutes before it was
    made, so a NOW from the start of a long run would come before the CA."""
    global NOW
    NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return make_pki(tmp_path / "pki")


@pytest.fixture
def impostor(tmp_path: Path) -> Path:
    """A second CA with the same name as make_pki's: only the signature tells them apart."""
    directory = tmp_path / "impostor"
    pki.init_ca(directory, name="test CA")
    pki.issue(directory, "app1", kind="client")
    pki.issue(directory, "server", kind="server", dns=["localhost"])
    return directory


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """An RSA CA with a server and a client (RSA-3072 key generation is slow: once per module)."""
    directory = tmp_path_factory.mktemp("rsa") / "ca"
    pki.init_ca(directory, name="rsa CA", key_type="rsa")
    pki.issue(directory, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"])
    pki.issue(directory, "app1", kind="client")
    return PKI(dir=directory, other=directory)


def server_config(p: PKI, directory: Path | None = None, **tls: Any) -> TunnelConfig:
    doc = server_doc(p, "127.0.0.1:9")
    doc["tls"].update({k: str(v) for k, v in tls.items()})
    return load_file(write_yaml((directory or p.dir.parent) / "server.yaml", doc))


def client_config(p: PKI, directory: Path | None = None, **tls: Any) -> TunnelConfig:
    doc = client_doc(p, "127.0.0.1:9")
    doc["tls"].update({k: str(v) for k, v in tls.items()})
    return load_file(write_yaml((directory or p.dir.parent) / "client.yaml", doc))


# -- handshakes through memory BIOs -----------------------------------------------------------


@dataclass
class Handshake:
    client: ssl.SSLObject
    server: ssl.SSLObject
    client_done: bool
    server_done: bool
    client_error: ssl.SSLError | None
    server_error: ssl.SSLError | None

    @property
    def ok(self) -> bool:
        return self.client_done and self.server_done and not (self.client_error or self.server_error)

    @property
    def refused(self) -> bool:
        return (not self.server_done and self.server_error is not None) or self.client_error is not None


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str = "localhost") -> Handshake:
    """Run a handshake to completion or failure, pumping bytes between the two sides."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    errors: dict[str, ssl.SSLError | None] = {"client": None, "server": None}
    for _ in range(100):
        for side, obj in (("client", client), ("server", server)):
            if done[side] or errors[side]:
                continue
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                errors[side] = exc
            else:
                done[side] = True
        to_server, to_client = c_out.read(), s_out.read()
        s_in.write(to_server)
        c_in.write(to_client)
        if not to_server and not to_client:
            break
    else:
        raise AssertionError("handshake did not settle")
    if done["client"] and errors["server"] is not None:
        # TLS 1.3: the client finishes first and only hears the server's alert on its next read.
        try:
            client.read(1)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            errors["client"] = exc
    return Handshake(client, server, done["client"], done["server"], errors["client"], errors["server"])


@pytest.fixture
def quiet_legacy() -> Iterator[None]:
    """Setting TLS 1.1 on a context is a DeprecationWarning (an error under filterwarnings=error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def plain_client(
    p: PKI,
    *,
    ciphers: str | None = None,
    minimum: ssl.TLSVersion = ssl.TLSVersion.MINIMUM_SUPPORTED,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    name: str = "app1",
) -> ssl.SSLContext:
    """A stdlib client presenting NAME from p, with whatever versions and suites a test forces."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    ctx.load_verify_locations(cafile=str(p.ca))
    ctx.load_cert_chain(p.crt(name), p.key(name))
    return ctx


def permissive_server(
    p: PKI,
    *,
    minimum: ssl.TLSVersion = ssl.TLSVersion.MINIMUM_SUPPORTED,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    """The control: a server with p's server certificate that accepts anything OpenSSL can do."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(p.crt("server"), p.key("server"))
    return ctx


def is_ecdhe_aead(suite: str) -> bool:
    return suite.startswith("ECDHE-") and ("-GCM-" in suite or suite.endswith("-CHACHA20-POLY1305"))


# -- load_trust ------------------------------------------------------------------------------


def test_load_trust_without_crl_revokes_nothing(p: PKI) -> None:
    trust = load_trust(server_config(p))
    assert trust.revoked == frozenset()
    assert trust.crl_next_update is None
    assert trust.anchors == (x509.load_pem_x509_certificate(p.ca.read_bytes()),)
    assert trust.intermediates == ()


def test_load_trust_reads_revoked_serials(p: PKI) -> None:
    config = server_config(p, crl=p.dir / "crl.pem")
    assert load_trust(config).revoked == frozenset()

    revoked_at = dt.datetime.now(dt.UTC)
    serial = pki.revoke(p.dir, "app1")

    trust = load_trust(config)
    assert serial == serial_of(p.crt("app1"))
    assert trust.revoked == {serial}
    assert serial_of(p.crt("app2")) not in trust.revoked
    assert trust.crl_next_update is not None
    assert trust.crl_next_update - revoked_at == pytest.approx(pki.CRL_VALIDITY, abs=dt.timedelta(minutes=1))


def test_a_der_crl_is_refused_with_a_clear_error(p: PKI) -> None:
    """OpenSSL's file lookup (what the handshake uses) reads PEM CRLs only: say so at load."""
    der = p.dir / "crl.der"
    der.write_bytes(x509.load_pem_x509_crl((p.dir / "crl.pem").read_bytes()).public_bytes(serialization.Encoding.DER))
    with pytest.raises(ConfigError, match="no PEM CRL") as info:
        load_trust(server_config(p, crl=der))
    assert info.value.key == "tls.crl"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not a CRL\n", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param(b"-----BEGIN X509 CRL-----\nbm9wZQ==\n-----END X509 CRL-----\n", id="bad-pem"),
        pytest.param(b"\x30\x82\x01\x00garbage", id="bad-der"),
    ],
)
def test_load_trust_refuses_a_crl_that_does_not_parse(p: PKI, content: bytes) -> None:
    crl = p.dir / "broken.crl"
    crl.write_bytes(content)
    with pytest.raises(ConfigError, match="no PEM CRL") as info:
        load_trust(server_config(p, crl=crl))
    assert info.value.key == "tls.crl"
    assert str(crl) in info.value.message


def test_load_trust_refuses_a_certificate_given_as_the_crl(p: PKI) -> None:
    with pytest.raises(ConfigError, match="no PEM CRL") as info:
        load_trust(server_config(p, crl=p.ca))
    assert info.value.key == "tls.crl"


def test_load_trust_refuses_a_crl_from_another_ca(p: PKI) -> None:
    with pytest.raises(ConfigError, match="not signed by a CA in") as info:
        load_trust(server_config(p, crl=p.other / "crl.pem"))
    assert info.value.key == "tls.crl"


def test_load_trust_refuses_a_crl_from_a_ca_with_the_same_name(p: PKI, impostor: Path) -> None:
    """Issuer names match, so only the signature check can catch this one."""
    forged = x509.load_pem_x509_crl((impostor / "crl.pem").read_bytes())
    assert forged.issuer == x509.load_pem_x509_certificate(p.ca.read_bytes()).subject
    with pytest.raises(ConfigError, match="not signed by a CA in") as info:
        load_trust(server_config(p, crl=impostor / "crl.pem"))
    assert info.value.key == "tls.crl"


def test_load_trust_refuses_a_crl_past_its_next_update(p: PKI) -> None:
    crl = write_crl(
        p.dir, p.dir / "old.pem", last_update=NOW - dt.timedelta(days=10), next_update=NOW - dt.timedelta(days=1)
    )
    with pytest.raises(ConfigError, match="out of date") as info:
        load_trust(server_config(p, crl=crl))
    assert info.value.key == "tls.crl"
    assert "tunnel ca crl" in info.value.message


def test_load_trust_next_update_boundary(p: PKI) -> None:
    next_update = NOW + dt.timedelta(hours=1)
    config = server_config(
        p, crl=write_crl(p.dir, p.dir / "crl.pem", last_update=NOW - dt.timedelta(hours=1), next_update=next_update)
    )

    trust = load_trust(config, now=next_update - dt.timedelta(microseconds=1))
    assert trust.crl_next_update == next_update
    with pytest.raises(ConfigError, match="out of date"):
        load_trust(config, now=next_update)
    with pytest.raises(ConfigError, match="out of date"):
        load_trust(config, now=next_update + dt.timedelta(days=1))


def test_refresh_crl_revives_an_out_of_date_crl_and_keeps_its_entries(p: PKI) -> None:
    serial = serial_of(p.crt("app2"))
    write_crl(
        p.dir,
        p.dir / "crl.pem",
        last_update=NOW - dt.timedelta(days=10),
        next_update=NOW - dt.timedelta(days=1),
        revoked=(serial,),
    )
    config = server_config(p, crl=p.dir / "crl.pem")
    with pytest.raises(ConfigError, match="out of date"):
        load_trust(config)

    pki.refresh_crl(p.dir)

    assert load_trust(config).revoked == {serial}


# -- check_certificates ----------------------------------------------------------------------


def test_check_certificates_good_certificate_no_warnings(p: PKI) -> None:
    assert check_certificates(server_config(p)) == []
    assert check_certificates(client_config(p)) == []


def test_check_certificates_warns_about_a_certificate_expiring_in_10_days(p: PKI) -> None:
    crt, key = issue_dated(
        p.dir, "soon", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=10), kind="server"
    )

    warnings = check_certificates(server_config(p, cert=crt, key=key), now=NOW)

    assert len(warnings) == 1
    assert str(crt) in warnings[0]
    assert "tls.cert" in warnings[0]
    assert "expires in 10 days" in warnings[0]
    assert f"{NOW + dt.timedelta(days=10):%Y-%m-%d}" in warnings[0]


def test_check_certificates_expiry_warning_boundary(p: PKI) -> None:
    not_after = NOW + dt.timedelta(days=100)
    crt, key = issue_dated(p.dir, "later", not_before=NOW - dt.timedelta(days=1), not_after=not_after, kind="server")
    config = server_config(p, cert=crt, key=key)

    assert check_certificates(config, now=not_after - EXPIRY_WARNING) == []
    assert len(check_certificates(config, now=not_after - EXPIRY_WARNING + dt.timedelta(seconds=1))) == 1
    assert len(check_certificates(config, now=not_after - dt.timedelta(seconds=1))) == 1
    with pytest.raises(ConfigError, match="expired"):
        check_certificates(config, now=not_after)


def test_check_certificates_warns_about_the_ca_too(tmp_path: Path) -> None:
    ca_dir = tmp_path / "short"
    pki.init_ca(ca_dir, name="short-lived CA", days=20)
    pki.issue(ca_dir, "server", kind="server", dns=["localhost"], days=10)
    short = PKI(dir=ca_dir, other=ca_dir)

    warnings = check_certificates(server_config(short))

    assert len(warnings) == 2
    assert any("tls.cert" in w and str(short.crt("server")) in w for w in warnings)
    assert any("tls.ca" in w and str(short.ca) in w for w in warnings)


def test_check_certificates_refuses_an_expired_certificate(p: PKI) -> None:
    # make_pki's "expired" certificate ended yesterday.
    with pytest.raises(ConfigError, match="expired") as info:
        check_certificates(server_config(p, cert=p.crt("expired"), key=p.key("expired")))
    assert info.value.key == "tls.cert"
    assert str(p.crt("expired")) in info.value.message


def test_check_certificates_refuses_a_certificate_not_yet_valid(p: PKI) -> None:
    crt, key = issue_dated(
        p.dir, "future", not_before=NOW + dt.timedelta(days=2), not_after=NOW + dt.timedelta(days=90), kind="server"
    )
    config = server_config(p, cert=crt, key=key)

    with pytest.raises(ConfigError, match="not valid before") as info:
        check_certificates(config, now=NOW)
    assert info.value.key == "tls.cert"
    assert check_certificates(config, now=NOW + dt.timedelta(days=3)) == []


def test_check_certificates_refuses_a_certificate_from_another_ca(p: PKI) -> None:
    config = server_config(p, cert=p.other / "other-server.crt", key=p.other / "other-server.key")
    with pytest.raises(ConfigError, match="does not chain to a CA in") as info:
        check_certificates(config)
    assert info.value.key == "tls.cert"


def test_check_certificates_refuses_a_certificate_from_a_ca_with_the_same_name(p: PKI, impostor: Path) -> None:
    config = server_config(p, cert=impostor / "server.crt", key=impostor / "server.key")
    with pytest.raises(ConfigError, match="does not chain to a CA in") as info:
        check_certificates(config)
    assert info.value.key == "tls.cert"


# -- Trust.refusal: what a full handshake would say, without one ------------------------------


def test_refusal_judges_a_presented_chain_as_the_handshake_would(p: PKI, impostor: Path) -> None:
    trust: Trust = load_trust(server_config(p))
    now = dt.datetime.now(dt.UTC)

    def refusal(*chain: Path, under: Trust = trust) -> tuple[str, str] | None:
        outcome = under.refusal([der_of(c) for c in chain], now)
        return (outcome.label, outcome.text) if outcome else None

    assert refusal(p.crt("app1")) is None
    assert refusal(p.crt("server")) is None
    assert (refusal(p.other / "other-app1.crt") or ("", ""))[0] == "unknown CA"
    assert (refusal(impostor / "app1.crt") or ("", ""))[0] == "unknown CA"
    assert refusal(p.crt("expired")) == ("certificate expired", "certificate expired")
    no_anchor = refusal(p.crt("app1"), under=Trust(anchors=(), intermediates=()))
    assert no_anchor is not None
    assert no_anchor[0] == "unknown CA"
    assert "no self-signed CA certificate" in no_anchor[1]


def test_refusal_says_revoked_and_crl_expired(p: PKI) -> None:
    config = server_config(p, crl=p.dir / "crl.pem")
    pki.revoke(p.dir, "app2")
    trust = load_trust(config)
    now = dt.datetime.now(dt.UTC)
    assert trust.refusal([der_of(p.crt("app1"))], now) is None
    assert str(trust.refusal([der_of(p.crt("app2"))], now)) == "revoked"
    assert trust.crl_next_update is not None
    assert str(trust.refusal([der_of(p.crt("app1"))], trust.crl_next_update)) == "CRL expired"


# -- build_context: options ------------------------------------------------------------------


def test_context_options(p: PKI) -> None:
    for config in (server_config(p), client_config(p)):
        ctx = build_context(config)
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert build_context(client_config(p)).check_hostname


def test_handshake_has_no_compression(p: PKI) -> None:
    result = handshake(build_context(client_config(p)), build_context(server_config(p)))
    assert result.ok
    assert result.client.compression() is None
    assert result.server.compression() is None


# -- build_context: versions -----------------------------------------------------------------


@pytest.mark.usefixtures("quiet_legacy")
def test_tls11_client_is_refused(p: PKI) -> None:
    # OpenSSL 3 only does TLS 1.1 at security level 0 (its handshake signatures use SHA-1).
    client = plain_client(
        p, ciphers="DEFAULT:@SECLEVEL=0", minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1
    )
    control = handshake(client, permissive_server(p, minimum=ssl.TLSVersion.TLSv1_1))
    assert control.ok, "this OpenSSL cannot do TLS 1.1 at all, so the refusal below proves nothing"
    assert control.server.version() == "TLSv1.1"

    result = handshake(client, build_context(server_config(p)))

    assert result.refused
    assert not result.server_done
    assert result.server_error is not None
    assert "UNSUPPORTED_PROTOCOL" in str(result.server_error)


@pytest.mark.usefixtures("quiet_legacy")
def test_tunnel_client_refuses_a_tls11_server(p: PKI) -> None:
    server = permissive_server(p, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1)
    control = handshake(
        plain_client(p, ciphers="DEFAULT:@SECLEVEL=0", minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1),
        server,
    )
    assert control.ok

    result = handshake(build_context(client_config(p)), server)

    assert result.refused
    assert not result.client_done
    # Refused for the version the client offers (1.2 and up), not merely for want of a suite.
    assert "UNSUPPORTED_PROTOCOL" in str(result.server_error)
    assert "PROTOCOL_VERSION" in str(result.client_error)


def test_tls12_client_gets_tls12(p: PKI) -> None:
    result = handshake(plain_client(p, maximum=ssl.TLSVersion.TLSv1_2), build_context(server_config(p)))
    assert result.ok
    assert result.server.version() == "TLSv1.2"
    cipher = result.server.cipher()
    assert cipher is not None
    assert is_ecdhe_aead(cipher[0]), cipher


def test_tunnel_pair_negotiates_tls13(p: PKI) -> None:
    result = handshake(build_context(client_config(p)), build_context(server_config(p)))
    assert result.ok
    assert result.client.version() == "TLSv1.3"


def test_min_version_13_server_refuses_a_tls12_client(p: PKI) -> None:
    client = plain_client(p, maximum=ssl.TLSVersion.TLSv1_2)
    assert handshake(client, build_context(server_config(p, min_version="1.2"))).ok

    result = handshake(client, build_context(server_config(p, min_version="1.3")))

    assert result.refused
    assert not result.server_done
    assert handshake(plain_client(p), build_context(server_config(p, min_version="1.3"))).ok


def test_min_version_13_client_refuses_a_tls12_server(p: PKI) -> None:
    server = permissive_server(p, maximum=ssl.TLSVersion.TLSv1_2)
    assert handshake(build_context(client_config(p, min_version="1.2")), server).ok

    result = handshake(build_context(client_config(p, min_version="1.3")), server)

    assert result.refused
    assert not result.client_done


# -- build_context: TLS 1.2 cipher suites ----------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "suite"),
    [
        ("ec", "ECDHE-ECDSA-AES128-SHA"),  # ECDHE, but CBC
        ("ec", "ECDHE-ECDSA-AES256-SHA384"),  # ECDHE, CBC with SHA-2
        ("ec", "AES128-GCM-SHA256"),  # static RSA key exchange (cannot work with an EC key anyway)
        ("rsa", "AES128-GCM-SHA256"),  # static RSA key exchange, AEAD
        ("rsa", "AES256-SHA256"),  # static RSA key exchange, CBC
        ("rsa", "ECDHE-RSA-AES128-SHA"),  # ECDHE, but CBC
        ("rsa", "ECDHE-RSA-AES256-SHA384"),  # ECDHE, CBC with SHA-2
    ],
)
def test_tls12_suite_outside_policy_is_refused(p: PKI, rsa_pki: PKI, key_type: str, suite: str) -> None:
    ca = rsa_pki if key_type == "rsa" else p
    client = plain_client(ca, ciphers=f"{suite}:@SECLEVEL=0", maximum=ssl.TLSVersion.TLSv1_2)

    result = handshake(client, build_context(server_config(ca, directory=p.dir.parent)))

    assert result.refused
    assert not result.server_done
    assert result.server_error is not None
    assert "NO_SHARED_CIPHER" in str(result.server_error)
    if suite != "AES128-GCM-SHA256" or key_type == "rsa":
        control = handshake(client, permissive_server(ca))
        assert control.ok, f"{suite} cannot be negotiated even without the policy"
        cipher = control.server.cipher()
        assert cipher is not None
        assert cipher[0] == suite


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_tls12_only_ecdhe_aead_suites_are_negotiated(p: PKI, rsa_pki: PKI, key_type: str) -> None:
    """Offer every TLS 1.2 suite this OpenSSL knows, one at a time."""
    ca = rsa_pki if key_type == "rsa" else p
    server = build_context(server_config(ca, directory=p.dir.parent))
    every = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    every.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    suites = [c["name"] for c in every.get_ciphers() if not c["name"].startswith("TLS_")]
    assert len(suites) > 50

    negotiated = set()
    for suite in suites:
        result = handshake(plain_client(ca, ciphers=f"{suite}:@SECLEVEL=0", maximum=ssl.TLSVersion.TLSv1_2), server)
        if result.ok:
            cipher = result.server.cipher()
            assert cipher is not None
            negotiated.add(cipher[0])

    sig = "ECDSA" if key_type == "ec" else "RSA"
    assert negotiated == {
        f"ECDHE-{sig}-AES128-GCM-SHA256",
        f"ECDHE-{sig}-AES256-GCM-SHA384",
        f"ECDHE-{sig}-CHACHA20-POLY1305",
    }
    assert all(is_ecdhe_aead(suite) for suite in negotiated)


# -- build_context: revocation ---------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_server_with_crl_refuses_a_revoked_client(p: PKI, version: ssl.TLSVersion) -> None:
    pki.revoke(p.dir, "app1")
    with_crl = build_context(server_config(p, crl=p.dir / "crl.pem"))
    revoked = plain_client(p, name="app1", minimum=version, maximum=version)
    assert handshake(revoked, build_context(server_config(p))).ok  # no tls.crl: nothing checks
    assert handshake(plain_client(p, name="app2", minimum=version, maximum=version), with_crl).ok

    result = handshake(revoked, with_crl)

    assert not result.server_done
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert result.server_error.verify_code == X509_V_ERR_CERT_REVOKED
    assert result.client_error is not None  # the client is told (an alert), at once or on its first read


def test_server_refuses_a_client_of_another_ca(p: PKI, impostor: Path) -> None:
    server = build_context(server_config(p))
    stranger = plain_client(PKI(dir=impostor, other=impostor), name="app1")
    stranger.load_verify_locations(cafile=str(p.ca))  # it trusts our server; we must not trust it

    result = handshake(stranger, server)

    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert not result.server_done


# -- build_context: server name --------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_name", "verify_code"),
    [
        ("wrong.example", X509_V_ERR_HOSTNAME_MISMATCH),
        ("127.0.0.2", X509_V_ERR_IP_ADDRESS_MISMATCH),
        ("::2", X509_V_ERR_IP_ADDRESS_MISMATCH),
    ],
)
def test_client_refuses_a_server_certificate_for_another_name(p: PKI, server_name: str, verify_code: int) -> None:
    # make_pki's server certificate names localhost, 127.0.0.1 and ::1.
    server = build_context(server_config(p))
    for good in ("localhost", "127.0.0.1", "::1"):
        assert handshake(build_context(client_config(p, server_name=good)), server, good).ok, good

    result = handshake(build_context(client_config(p, server_name=server_name)), server, server_name)

    assert not result.client_done
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert result.client_error.verify_code == verify_code


def test_client_refuses_a_server_of_another_ca(p: PKI, impostor: Path) -> None:
    """Same CA name, same host name: only the signature differs."""
    impostor_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor_server.load_cert_chain(impostor / "server.crt", impostor / "server.key")

    result = handshake(build_context(client_config(p)), impostor_server)

    assert not result.client_done
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


# -- check_certificates: the certificate's role ------------------------------------------------


def test_check_refuses_a_client_certificate_in_a_server_tunnel_and_the_reverse(p: PKI) -> None:
    """Either passed check before, then failed every handshake ("unsupported certificate")."""
    with pytest.raises(ConfigError, match=r"may not be used by a TLS server \(extendedKeyUsage: clientAuth\)") as info:
        check_certificates(server_config(p, cert=p.crt("app1"), key=p.key("app1")))
    assert info.value.key == "tls.cert"
    assert "tunnel ca issue ... --server" in info.value.message
    with pytest.raises(ConfigError, match=r"may not be used by a TLS client \(extendedKeyUsage: serverAuth\)") as info:
        check_certificates(client_config(p, cert=p.crt("server"), key=p.key("server")))
    assert "--client" in info.value.message
    assert check_certificates(server_config(p)) == []
    assert check_certificates(client_config(p)) == []


# -- build_context: key exchange groups --------------------------------------------------------

ACCEPTED_GROUPS = ["X25519", "prime256v1", "secp384r1"]
# ffdhe8192 costs the server ~120 ms of CPU per handshake; X448 and P-521 were simply never meant.
REFUSED_GROUPS = ["ffdhe2048", "ffdhe8192", "X448", "secp521r1"]


def only_group(ctx: ssl.SSLContext, group: str) -> ssl.SSLContext:
    """`ctx` offering (client) or accepting (server) `group` alone. The stdlib's
    `set_ecdh_curve` sets OpenSSL 3's group list to that one group, ffdhe ones included."""
    ctx.set_ecdh_curve(group)
    return ctx


@pytest.mark.parametrize("group", ACCEPTED_GROUPS)
def test_server_accepts_x25519_p256_and_p384(p: PKI, group: str) -> None:
    client = only_group(plain_client(p, minimum=ssl.TLSVersion.TLSv1_3), group)
    assert handshake(client, build_context(server_config(p))).ok


@pytest.mark.parametrize("group", REFUSED_GROUPS)
def test_server_refuses_a_tls13_client_offering_only_another_group(p: PKI, group: str) -> None:
    client = only_group(plain_client(p, minimum=ssl.TLSVersion.TLSv1_3), group)
    assert handshake(client, permissive_server(p)).ok, f"{group} cannot be negotiated even without the policy"

    result = handshake(client, build_context(server_config(p)))

    assert result.refused
    assert not result.server_done
    assert "NO_SUITABLE_KEY_SHARE" in str(result.server_error)


@pytest.mark.parametrize("group", ["X448", "secp521r1"])
def test_server_refuses_a_tls12_client_offering_only_another_curve(p: PKI, rsa_pki: PKI, group: str) -> None:
    """With an RSA certificate (TLS 1.2 ECDSA would also need the certificate's curve offered)."""
    client = only_group(plain_client(rsa_pki, maximum=ssl.TLSVersion.TLSv1_2), group)
    assert handshake(client, permissive_server(rsa_pki)).ok, f"{group} cannot be negotiated even without the policy"

    result = handshake(client, build_context(server_config(rsa_pki, directory=p.dir.parent)))

    assert result.refused
    assert not result.server_done
    assert "NO_SHARED_CIPHER" in str(result.server_error)  # no ECDHE suite without a shared curve


@pytest.mark.parametrize(
    ("group", "accepted"), [(g, True) for g in ACCEPTED_GROUPS] + [(g, False) for g in REFUSED_GROUPS]
)
def test_client_tunnel_offers_only_x25519_p256_and_p384(p: PKI, group: str, accepted: bool) -> None:
    server = only_group(permissive_server(p), group)
    assert handshake(plain_client(p), server).ok or not accepted

    result = handshake(build_context(client_config(p)), server)

    assert result.ok is accepted, result
    if not accepted:
        assert not result.server_done  # the server found nothing it takes among what the tunnel offers


def test_without_openssl_access_the_groups_fall_back_to_p256_alone(
    p: PKI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Python whose ssl module the ctypes calls cannot reach: still no ffdhe (one curve,
    P-256, the stdlib can set), and a warning."""
    import tunnel.tls

    monkeypatch.setattr(tunnel.tls, "set_groups", lambda ctx, groups: False)
    tunnel.tls._warn_once.cache_clear()
    server = build_context(server_config(p))
    tunnel.tls._warn_once.cache_clear()

    assert "key exchange limited to prime256v1" in caplog.text
    assert handshake(only_group(plain_client(p), "prime256v1"), server).ok
    for group in ("X25519", "ffdhe8192"):
        assert handshake(only_group(plain_client(p, minimum=ssl.TLSVersion.TLSv1_3), group), server).refused


# -- build_context: the peer's certificate list ------------------------------------------------


def test_server_refuses_a_client_certificate_list_past_the_bound(p: PKI, tmp_path: Path) -> None:
    """app1, a client the tunnel admits, with 150 junk certificates after it (~96 KB)."""
    padded = write_padded_chain(p.crt("app1"), tmp_path / "padded.pem")
    client = plain_client(p)
    client.load_cert_chain(padded, p.key("app1"))
    # Control: without the bound (OpenSSL's default is 100 KiB) the junk is ignored and app1 admitted.
    assert handshake(client, p.server_context()).ok

    result = handshake(client, build_context(server_config(p)))

    assert result.refused
    assert not result.server_done
    assert "EXCESSIVE_MESSAGE_SIZE" in str(result.server_error)
    assert handshake(plain_client(p), build_context(server_config(p))).ok


def test_a_chain_with_intermediates_is_well_within_the_bound(p: PKI, tmp_path: Path) -> None:
    """Four more certificates (~2.5 KB) after the leaf: nowhere near MAX_CERT_LIST."""
    padded = write_padded_chain(p.crt("app1"), tmp_path / "padded.pem", junk=4)
    client = plain_client(p)
    client.load_cert_chain(padded, p.key("app1"))
    assert handshake(client, build_context(server_config(p))).ok


def test_client_tunnel_refuses_a_server_certificate_list_past_the_bound(p: PKI, tmp_path: Path) -> None:
    server = permissive_server(p)
    server.load_cert_chain(write_padded_chain(p.crt("server"), tmp_path / "padded.pem"), p.key("server"))
    assert handshake(plain_client(p), server).ok

    result = handshake(build_context(client_config(p)), server)

    assert not result.client_done
    assert "EXCESSIVE_MESSAGE_SIZE" in str(result.client_error)


# -- the chain sent after the tunnel's own certificate -----------------------------------------


def stored_chain_length(ctx: ssl.SSLContext) -> int:
    """How many certificates the context holds as its certificate's chain (SSL_CTX_get0_chain_certs)."""
    lib, handle = libssl(), ssl_ctx_pointer(ctx)
    assert lib is not None
    assert handle is not None
    stack = ctypes.c_void_p()
    assert lib.SSL_CTX_ctrl(handle, SSL_CTRL_GET_CHAIN_CERTS, 0, ctypes.byref(stack)) == 1
    return int(lib.OPENSSL_sk_num(stack)) if stack.value else 0


def test_the_chain_after_a_leaf_alone_is_built_once_with_the_context_and_sent_as_before(p: PKI) -> None:
    """tls.cert holds the leaf alone: OpenSSL used to build the chain it sends from tls.ca in
    every handshake; now the context holds it, and the peer receives the same certificates."""
    server, client = build_context(server_config(p)), build_context(client_config(p))
    auto = p.server_context()  # control: a stdlib context, whose chain OpenSSL builds per handshake
    assert stored_chain_length(auto) == 0
    sent_by_auto = _chain_der(handshake(plain_client(p), auto).client, "get_unverified_chain")

    assert stored_chain_length(server) == 1
    assert stored_chain_length(client) == 1
    result = handshake(plain_client(p), server)
    assert result.ok
    assert _chain_der(result.client, "get_unverified_chain") == sent_by_auto == (der_of(p.crt("server")), der_of(p.ca))
    result = handshake(client, server)
    assert result.ok
    assert _chain_der(result.server, "get_unverified_chain") == (der_of(p.crt("app1")), der_of(p.ca))


def test_a_chain_in_the_certificate_file_is_sent_as_it_is(tmp_path: Path) -> None:
    """tls.cert with its intermediate after the leaf (tunnel ca init --parent): that chain,
    not one built from tls.ca (which would add the root)."""
    root, issuing = tmp_path / "root", tmp_path / "issuing"
    pki.init_ca(root, name="root CA")
    pki.init_ca(issuing, name="issuing CA", parent=root)
    pki.issue(issuing, "server", kind="server", dns=["localhost"])
    pki.issue(issuing, "app1", kind="client")
    p = PKI(dir=issuing, other=root)
    server = build_context(server_config(p, tmp_path, ca=root / "ca.crt"))
    assert stored_chain_length(server) == 1
    client = plain_client(p)
    client.load_verify_locations(cafile=str(root / "ca.crt"))

    result = handshake(client, server)

    assert result.ok
    sent = (der_of(issuing / "server.crt"), der_of(issuing / "ca.crt"))
    assert _chain_der(result.client, "get_unverified_chain") == sent
