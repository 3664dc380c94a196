"""Fixtures shared by every test layer."""

from __future__ import annotations

import os

# Before tunnel is imported (here and in every daemon the tests start): a view of the
# relay's scratch buffer used after it was overwritten raises (streams.ScratchMisuse).
os.environ["TUNNEL_CHECK_SCRATCH"] = "1"

from pathlib import Path

import pytest

from tests.helpers import PKI, make_pki


@pytest.fixture(scope="session")
def pki_files(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA with a server certificate, clients app1/app2/stranger/expired, and a second CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
