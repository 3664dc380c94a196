"""tls.renew: when a certificate is due for renewal (tunnel.renewal.renewal_due, a table),
and how `tls.renew` is read from a tunnel file (tunnel.config)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tunnel.config import ConfigError, Renew, load_file
from tunnel.renewal import JITTER, renewal_due
from tunnel.status import render

from .test_config import client_doc, make_pki_files, server_doc, write_yaml

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
URL = "https://ca.internal:8443"


@pytest.mark.parametrize(
    ("lifetime", "renew", "jitter", "due_after_not_before"),
    [
        # a share of the lifetime left: 90 days at 33% → 60.3 days in
        (90 * DAY, Renew(URL, fraction=0.33), 0.0, 90 * DAY * 0.67),
        (30 * timedelta(seconds=1), Renew(URL, fraction=0.33), 0.0, timedelta(seconds=20.1)),
        (100 * DAY, Renew(URL, fraction=0.5), 0.0, 50 * DAY),
        (100 * DAY, Renew(URL, fraction=0.01), 0.0, 99 * DAY),
        (100 * DAY, Renew(URL, fraction=0.99), 0.0, 1 * DAY),
        # a duration before notAfter
        (DAY, Renew(URL, fraction=None, seconds=8 * 3600), 0.0, 16 * timedelta(hours=1)),
        (90 * DAY, Renew(URL, fraction=None, seconds=30 * 86400), 0.0, 60 * DAY),
        # jitter: earlier by up to JITTER of the lifetime, never more
        (100 * DAY, Renew(URL, fraction=0.5), 1.0, 50 * DAY - 100 * DAY * JITTER),
        (100 * DAY, Renew(URL, fraction=0.5), 0.5, 50 * DAY - 100 * DAY * JITTER / 2),
        (100 * DAY, Renew(URL, fraction=0.5), 7.0, 50 * DAY - 100 * DAY * JITTER),  # clamped
        (100 * DAY, Renew(URL, fraction=0.5), -1.0, 50 * DAY),  # clamped
        # a duration longer than the lifetime: due at once (at notBefore)
        (DAY, Renew(URL, fraction=None, seconds=2 * 86400), 0.0, timedelta(0)),
        (timedelta(seconds=30), Renew(URL, fraction=None, seconds=3600), 1.0, timedelta(0)),
        (timedelta(seconds=30), Renew(URL, fraction=0.99), 1.0, timedelta(0)),
    ],
)
def test_renewal_due_when_the_share_or_duration_is_left_less_jitter(
    lifetime: timedelta, renew: Renew, jitter: float, due_after_not_before: timedelta
) -> None:
    due = renewal_due(T0, T0 + lifetime, renew, jitter)
    assert abs(due - (T0 + due_after_not_before)) < timedelta(milliseconds=1)


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.37, 0.5, 0.99, 1.0])
def test_jitter_only_ever_makes_renewal_earlier_by_at_most_five_percent(jitter: float) -> None:
    lifetime = 90 * DAY
    plain = renewal_due(T0, T0 + lifetime, Renew(URL, fraction=0.33), 0.0)
    due = renewal_due(T0, T0 + lifetime, Renew(URL, fraction=0.33), jitter)
    assert plain - lifetime * 0.05 - timedelta(milliseconds=1) <= due <= plain


def test_an_already_due_certificate_renews_at_once() -> None:
    """A certificate past its renewal time (a daemon started late, a renewal that kept
    failing) is due now: the renewal time is in the past, so the wait is zero."""
    now = datetime.now(UTC)
    due = renewal_due(now - 25 * DAY, now + 5 * DAY, Renew(URL, fraction=0.33), 0.0)
    assert due < now


def load_renew(tmp_path: Path, renew: Any, doc: Any = server_doc) -> Renew | None:
    conf = make_pki_files(tmp_path / "conf")
    tls = {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem", "renew": renew}
    return load_file(write_yaml(conf / "t.yaml", doc(tls=tls))).tls.renew


@pytest.mark.parametrize(
    ("renew", "expected"),
    [
        ({"url": URL}, Renew(URL, fraction=0.33, seconds=None)),
        ({"url": URL, "before": "33%"}, Renew(URL, fraction=0.33, seconds=None)),
        ({"url": URL, "before": "1%"}, Renew(URL, fraction=0.01, seconds=None)),
        ({"url": URL, "before": "99 %"}, Renew(URL, fraction=0.99, seconds=None)),
        ({"url": URL, "before": "8h"}, Renew(URL, fraction=None, seconds=8 * 3600.0)),
        ({"url": URL, "before": "90s"}, Renew(URL, fraction=None, seconds=90.0)),
        ({"url": URL, "before": 600}, Renew(URL, fraction=None, seconds=600.0)),
        ({"url": "https://ca.internal"}, Renew("https://ca.internal", fraction=0.33, seconds=None)),
    ],
)
def test_tls_renew_reads_a_share_or_a_duration(tmp_path: Path, renew: Any, expected: Renew) -> None:
    assert load_renew(tmp_path, renew) == expected
    assert load_renew(tmp_path / "client", renew, client_doc) == expected


def test_without_tls_renew_nothing_renews(tmp_path: Path) -> None:
    conf = make_pki_files(tmp_path / "conf")
    assert load_file(write_yaml(conf / "t.yaml", server_doc())).tls.renew is None


@pytest.mark.parametrize(
    ("renew", "key", "message"),
    [
        ({"url": URL, "every": "1h"}, "tls.renew.every", "unknown key"),
        ({"before": "33%"}, "tls.renew.url", "required"),
        ({"url": "http://ca.internal:8080"}, "tls.renew.url", "expected https://HOST"),
        ({"url": "ca.internal:8443"}, "tls.renew.url", "expected https://HOST"),
        ({"url": "https://:8443"}, "tls.renew.url", "expected https://HOST"),
        ({"url": "https://ca.internal:99999"}, "tls.renew.url", "expected https://HOST"),
        ({"url": "https://ca.internal/est"}, "tls.renew.url", "expected https://HOST"),
        ({"url": 5}, "tls.renew.url", "expected a non-empty string"),
        ({"url": URL, "before": "0%"}, "tls.renew.before", "from 1% to 99%"),
        ({"url": URL, "before": "100%"}, "tls.renew.before", "from 1% to 99%"),
        ({"url": URL, "before": "0s"}, "tls.renew.before", "more than zero"),
        ({"url": URL, "before": "soon"}, "tls.renew.before", "a percentage such as 33%"),
        ({"url": URL, "before": "-5h"}, "tls.renew.before", "a percentage such as 33%"),
        ("https://ca.internal", "tls.renew", "expected a mapping"),
    ],
)
def test_a_bad_tls_renew_names_its_key(tmp_path: Path, renew: Any, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_renew(tmp_path, renew)
    assert caught.value.key == key
    assert message in str(caught.value)


def test_tunnel_status_shows_each_failing_renewal_escaped() -> None:
    health = {
        "status": "ok",
        "tunnels": {"redis": "listening"},
        "renewal": {
            "redis": {"failing_since": "2026-01-01T00:00:00+00:00", "reason": "10.0.0.1:8443: Connection refused"},
            "edge\x1b]0;x\x07": {"failing_since": "2026-01-02T00:00:00+00:00", "reason": "403 revoked\n"},
        },
    }
    lines = render(health, []).split("\n")
    assert lines[1] == "renewal of redis failing since 2026-01-01T00:00:00+00:00: 10.0.0.1:8443: Connection refused"
    assert lines[2] == "renewal of edge\\x1b]0;x\\x07 failing since 2026-01-02T00:00:00+00:00: 403 revoked\\n"


def test_a_certificate_the_tunnel_renews_is_not_warned_about(tmp_path: Path) -> None:
    """A short-lived certificate always expires within 30 days: with tls.renew, renewal
    (and its own failure reports) take care of it, instead of a warning on every reload."""
    from tests import helpers
    from tunnel import pki
    from tunnel.trust import check_certificates

    p = helpers.make_pki(tmp_path / "pki")
    pki.issue(p.dir, "brief", kind="server", dns=["localhost"], lifetime=timedelta(hours=1))
    doc = helpers.server_doc(p, "127.0.0.1:9")
    doc["tls"].update(cert=str(p.crt("brief")), key=str(p.key("brief")))
    assert len(check_certificates(load_file(helpers.write_yaml(tmp_path / "plain.yaml", doc)))) == 1
    doc["tls"]["renew"] = {"url": "https://127.0.0.1:8443"}
    assert check_certificates(load_file(helpers.write_yaml(tmp_path / "renewing.yaml", doc))) == []
