"""Monitoring a real `tunnel run`: the alert rules (deploy/prometheus) and the dashboard
(deploy/grafana) ask only for series the daemon exports, and `metrics.per_identity`
counts connections per peer identity, bounded by `metrics.max_identities`."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_operations import get, metric
from tests.helpers import PKI, free_port, issue_dated, server_doc, write_yaml
from tests.process import DaemonProcess, EchoTarget, echo_once, is_closed, tls_client

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "tunnel-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tunnel.json"

# Series Prometheus makes itself for every scrape target, not the daemon.
PROMETHEUS_OWN = {"up"}


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics text can hold, from its families' types: a counter
    NAME is scraped as NAME_total (and NAME_created), a histogram as NAME_bucket,
    NAME_sum, NAME_count (and NAME_created), a gauge as NAME. A family with no sample
    yet (a labelled counter nothing has counted) still names its series."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "untyped": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def used_names(expression: str) -> set[str]:
    """The series names a PromQL expression selects (every tunnel_* identifier and `up`),
    once quoted strings (label values, Grafana's `$variables` in them) are taken out."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    names = set(re.findall(r"\btunnel_[A-Za-z0-9_:]+", bare))
    names.update(name for name in PROMETHEUS_OWN if re.search(rf"\b{name}\b(?!\s*\()", bare))
    return names


def rule_expressions() -> list[str]:
    document = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    """Each panel target's `expr` and each query variable's query."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def client_certificates(ca_dir: Path, out: Path, count: int) -> list[str]:
    """`count` client certificates c000, c001, ... (cheap P-256 keys) signed by the CA."""
    out.mkdir()
    now = dt.datetime.now(dt.UTC)
    names = [f"c{i:03d}" for i in range(count)]
    for name in names:
        issue_dated(ca_dir, name, not_before=now - dt.timedelta(hours=1), not_after=now + dt.timedelta(days=1), out=out)
    return names


def connect_as(p: PKI, port: int, crt: Path, key: Path, data: bytes) -> bytes | None:
    """Send `data` as the holder of crt/key and read it back; None if refused (a reset,
    an alert or an end before anything came back)."""
    context = ssl.create_default_context(cafile=str(p.ca))
    context.load_cert_chain(crt, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            return echo_once(sock, data) or None
    except (OSError, ssl.SSLError):
        return None


def scrape(status: int) -> str:
    code, body = get(status, "/metrics")
    assert code == 200
    return body.decode()


def settled(status: int) -> str:
    """/metrics once every connection has ended (and been counted as closed)."""
    deadline = time.monotonic() + 10
    while True:
        text = scrape(status)
        if metric(text, "tunnel_active_connections", tunnel="edge") == 0:
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


@pytest.fixture
def running(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> tuple[DaemonProcess, int, int]:
    """A server tunnel `edge` with a CRL and metrics.per_identity, its status address,
    one connection relayed and one refused: every kind of series has something in it."""
    port, status = free_port(), free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}", metrics={"per_identity": True})
    doc["tls"]["crl"] = str(pki_files.dir / "crl.pem")
    daemon = DaemonProcess(tmp_path, "--status", f"127.0.0.1:{status}", str(write_yaml(tmp_path / "edge.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    with tls_client(pki_files, port, "app1") as sock:
        assert echo_once(sock, b"ping") == b"ping"
    with tls_client(pki_files, port, "stranger") as refused:
        assert is_closed(refused)
    return daemon, port, status


def test_every_series_the_alert_rules_and_the_dashboard_use_is_one_the_daemon_exports(
    running: tuple[DaemonProcess, int, int],
) -> None:
    _, _, status = running
    exported = exported_names(settled(status))
    assert {"tunnel_connections_opened_total", "tunnel_handshake_duration_seconds_bucket"} <= exported
    assert "tunnel_connections_opened" not in exported, "a counter is scraped with its _total suffix"
    for source, expressions in (("tunnel-rules.yaml", rule_expressions()), ("tunnel.json", dashboard_expressions())):
        assert expressions, f"no expressions found in {source}"
        for expression in expressions:
            names = used_names(expression)
            assert names, f"{source}: selects no series: {expression}"
            unknown = names - exported - PROMETHEUS_OWN
            assert not unknown, f"{source}: {sorted(unknown)} not exported by the daemon, in: {expression}"


def test_the_names_check_catches_a_counter_without_its_suffix_and_a_misspelling() -> None:
    text = (
        "# HELP tunnel_x_total X.\n# TYPE tunnel_x_total counter\ntunnel_x_total 1.0\n"
        "# HELP tunnel_h H.\n# TYPE tunnel_h histogram\n"
        'tunnel_h_bucket{le="+Inf"} 1.0\ntunnel_h_sum 1.0\ntunnel_h_count 1.0\n'
    )
    exported = exported_names(text)
    assert used_names('rate(tunnel_x{tunnel=~"$tunnel_y"}[5m])') - exported == {"tunnel_x"}
    assert used_names("histogram_quantile(0.9, rate(tunnel_h_bucket[5m]))") <= exported
    assert used_names("tunnel_h_buckets") - exported == {"tunnel_h_buckets"}
    assert used_names('up{job="tunnel"} == 0') == {"up"}


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in (
        "Open connections",
        "Refusals by reason",
        "Bytes relayed",
        "Handshake latency",
        "Certificate expiry",
        "CRL next update",
        "Opened by identity",
        "Refused by identity",
        "Bytes by identity",
    ):
        assert wanted in titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all("histogram_quantile" not in t["expr"] or "_bucket" in t["expr"] for t in panel["targets"])


def test_per_identity_counts_the_first_max_identities_by_name_and_the_rest_as_other(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    names = client_certificates(pki_files.dir, tmp_path / "clients", 150)
    allowed = names[:140]  # c140..c149 are refused (after their certificate was read)
    port, status = free_port(), free_port()
    doc = server_doc(
        pki_files,
        target.address,
        listen=f"127.0.0.1:{port}",
        allow={"cn": allowed},
        metrics={"per_identity": True, "max_identities": 100},
        limits={"handshake_timeout": "5s", "connect_timeout": "5s"},
    )
    daemon = DaemonProcess(tmp_path, "--status", f"127.0.0.1:{status}", str(write_yaml(tmp_path / "edge.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    for index, name in enumerate(names):
        crt, key = tmp_path / "clients" / f"{name}.crt", tmp_path / "clients" / f"{name}.key"
        data = b"x" * (index + 1)
        got = connect_as(pki_files, port, crt, key, data)
        assert got == (data if name in allowed else None), name
    # A named identity keeps its series after the cap is reached: c000 again, 1000 bytes.
    c000 = tmp_path / "clients" / "c000.crt", tmp_path / "clients" / "c000.key"
    assert connect_as(pki_files, port, *c000, b"y" * 1000) == b"y" * 1000
    # An open connection's bytes count under its identity at once, not only when it ends.
    context = ssl.create_default_context(cafile=str(pki_files.ca))
    context.load_cert_chain(tmp_path / "clients" / "c001.crt", tmp_path / "clients" / "c001.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as held,
    ):
        assert echo_once(held, b"z" * 7) == b"z" * 7
        during = scrape(status)
        assert metric(during, "tunnel_identity_bytes_total", tunnel="edge", identity="cn=c001", direction="in") == 2 + 7
        assert metric(during, "tunnel_identity_connections_opened_total", tunnel="edge", identity="cn=c001") == 2
    text = settled(status)

    families = {f.name: f for f in text_string_to_metric_families(text)}

    def counts(family: str, *labels: str) -> dict[Any, float]:
        samples = [s for s in families[family].samples if s.name.endswith("_total")]
        return {tuple(s.labels[label] for label in labels): s.value for s in samples}

    opened = {
        identity: value for (identity,), value in counts("tunnel_identity_connections_opened", "identity").items()
    }
    named = {f"cn={name}" for name in names[:100]}
    assert set(opened) == named | {"other"}, "exactly 100 identities by name, then other"
    assert opened["cn=c000"] == opened["cn=c001"] == 2
    assert all(opened[f"cn={name}"] == 1 for name in names[2:100])
    assert opened["other"] == 40  # c100..c139
    assert counts("tunnel_identity_connections_refused", "identity", "reason") == {("other", "not allowed"): 10}
    closed = counts("tunnel_identity_connections_closed", "identity", "reason")
    assert closed == {(identity, "done"): value for identity, value in opened.items()}
    identities = {s.labels["identity"] for f in families.values() for s in f.samples if "identity" in s.labels}
    assert identities == named | {"other"}
    # bytes: connection i sent and got back i+1 bytes
    assert metric(text, "tunnel_identity_bytes_total", tunnel="edge", identity="cn=c000", direction="in") == 1 + 1000
    assert metric(text, "tunnel_identity_bytes_total", tunnel="edge", identity="cn=c099", direction="out") == 100
    other = sum(range(101, 141))
    assert metric(text, "tunnel_identity_bytes_total", tunnel="edge", identity="other", direction="in") == other
    assert metric(text, "tunnel_identity_bytes_total", tunnel="edge", identity="other", direction="out") == other
    # the per-tunnel series are as they always were
    assert metric(text, "tunnel_connections_opened_total", tunnel="edge") == 142
    assert metric(text, "tunnel_connections_refused_total", tunnel="edge", reason="not allowed") == 10
    total = sum(range(1, 141)) + 1000 + 7
    assert metric(text, "tunnel_bytes_total", tunnel="edge", direction="in") == total


def test_without_per_identity_no_series_has_an_identity_label(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    port, status = free_port(), free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    daemon = DaemonProcess(tmp_path, "--status", f"127.0.0.1:{status}", str(write_yaml(tmp_path / "edge.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    with tls_client(pki_files, port, "app1") as sock:
        assert echo_once(sock, b"ping") == b"ping"
    with tls_client(pki_files, port, "stranger") as refused:
        assert is_closed(refused)
    daemon.wait_for("refused: not allowed")
    text = settled(status)
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert not [s for s in samples if "identity" in s.labels]
    assert not [s for s in samples if s.name.startswith("tunnel_identity_")]
    assert metric(text, "tunnel_connections_opened_total", tunnel="edge") == 1
    assert metric(text, "tunnel_connections_refused_total", tunnel="edge", reason="not allowed") == 1
    assert metric(text, "tunnel_bytes_total", tunnel="edge", direction="in") == 4
