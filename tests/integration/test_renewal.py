"""tunnel.renewal.renew against a real `tunnel ca serve` (in this trio run, real TLS on
127.0.0.1): what it writes over tls.cert and tls.key, and that a refusal writes nothing."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tunnel import pki
from tunnel.ca import serve
from tunnel.config import Renew, TLSConfig
from tunnel.renewal import RenewError, renew

PASSWORD = b"s3cret"


@asynccontextmanager
async def est_service(directory: Path) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(serve.serve, directory, "127.0.0.1", 0)
        yield f"https://{addresses[0]}"
        nursery.cancel_scope.cancel()


@pytest.fixture
def intermediate(tmp_path: Path) -> Path:
    """A root CA and an intermediate issuing CA under it (tls.ca: the root alone)."""
    pki.init_ca(tmp_path / "root")
    pki.init_ca(tmp_path / "issuing", parent=tmp_path / "root")
    return tmp_path / "issuing"


def own_copy(ca: Path, name: str, out: Path) -> tuple[Path, Path]:
    out.mkdir(mode=0o700)
    crt, key = out / f"{name}.crt", out / f"{name}.key"
    shutil.copy2(ca / f"{name}.crt", crt)
    shutil.copy2(ca / f"{name}.key", key)
    return crt, key


async def test_renew_writes_an_encrypted_key_and_keeps_the_intermediates(intermediate: Path, tmp_path: Path) -> None:
    pki.issue(
        intermediate, "db", kind="server", ips=["127.0.0.1"], key_password=PASSWORD, lifetime=dt.timedelta(hours=1)
    )
    crt, key = own_copy(intermediate, "db", tmp_path / "db")
    password_file = tmp_path / "db" / "db.pass"
    password_file.write_bytes(PASSWORD + b"\n")
    old_leaf, old_intermediate = x509.load_pem_x509_certificates(crt.read_bytes())
    async with est_service(intermediate) as url:
        tls = TLSConfig(
            cert=crt, key=key, ca=intermediate / pki.ROOT_CRT, key_password_file=password_file, renew=Renew(url)
        )
        renewed = await renew(tls)
    leaf, chained = x509.load_pem_x509_certificates(crt.read_bytes())
    assert leaf.serial_number == renewed.serial != old_leaf.serial_number
    assert leaf.not_valid_after_utc == renewed.not_after
    assert leaf.subject == old_leaf.subject
    assert (
        leaf.not_valid_after_utc - leaf.not_valid_before_utc
        == old_leaf.not_valid_after_utc - old_leaf.not_valid_before_utc
    )
    assert chained == old_intermediate
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key.read_bytes(), None)
    new_key = serialization.load_pem_private_key(key.read_bytes(), PASSWORD)
    assert isinstance(new_key, ec.EllipticCurvePrivateKey)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert new_key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    assert sorted(p.name for p in crt.parent.iterdir()) == ["db.crt", "db.key", "db.pass"], "no temporary file left"


async def test_a_refused_renewal_writes_nothing(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    pki.issue(ca, "app1", kind="client", lifetime=dt.timedelta(hours=1))
    crt, key = own_copy(ca, "app1", tmp_path / "app1")
    before = crt.read_bytes(), key.read_bytes()
    pki.revoke(ca, "app1")
    async with est_service(ca) as url:
        with pytest.raises(RenewError, match=r"simplereenroll refused: 403 .*revoked"):
            await renew(TLSConfig(cert=crt, key=key, ca=ca / pki.CA_CRT, renew=Renew(url)))
    assert (crt.read_bytes(), key.read_bytes()) == before
    assert sorted(p.name for p in crt.parent.iterdir()) == ["app1.crt", "app1.key"]
