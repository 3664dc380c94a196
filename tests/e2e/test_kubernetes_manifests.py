"""deploy/kubernetes/ read as the cluster would run it: every tunnel file in a ConfigMap
passes `tunnel check` with certificates like those cert-manager writes, laid out where the
pods mount them, as the kubelet lays them out; and the pieces agree with each other (the
client's target is a Service of a server tunnel, whose certificate has the name the client
checks, whose allow admits the client's certificate; no Service reaches a database).

scripts/check-deploy.sh validates the same manifests against the Kubernetes schemas."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubelet import project
from tests.process import TUNNEL
from tunnel import pki

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
CERT_MANAGER_KEYS = {"tls.crt", "tls.key", "ca.crt"}


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


@dataclass
class TunnelContainer:
    workload: str
    pod: dict[str, Any]
    container: dict[str, Any]
    sidecar: bool  # an init container with restartPolicy: Always
    files: dict[str, dict[str, Any]]  # the ConfigMap's tunnel files, parsed
    certs_mount: str
    certificate: dict[str, Any]  # the cert-manager Certificate whose Secret is mounted there
    default_mode: int


def tunnel_containers() -> Iterator[TunnelContainer]:
    config_maps, certificates = of_kind("ConfigMap"), of_kind("Certificate")
    by_secret = {c["spec"]["secretName"]: c for c in certificates.values()}
    for workload in [*of_kind("Deployment").values(), *of_kind("StatefulSet").values()]:
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        listed = [(c, False) for c in pod["containers"]] + [(c, True) for c in pod.get("initContainers", [])]
        for container, init in listed:
            if not container["image"].startswith("tunnel:"):
                continue
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            conf = mounts[container["args"][-1]]["configMap"]["name"]
            certs_mount, secret = next((p, v["secret"]) for p, v in mounts.items() if "secret" in v)
            yield TunnelContainer(
                workload=workload["metadata"]["name"],
                pod=pod,
                container=container,
                sidecar=init and container.get("restartPolicy") == "Always",
                files={name: yaml.safe_load(text) for name, text in config_maps[conf]["data"].items()},
                certs_mount=certs_mount,
                certificate=by_secret[secret["secretName"]],
                default_mode=secret["defaultMode"],
            )


TUNNELS = list(tunnel_containers())


def kind_of(certificate: dict[str, Any]) -> str:
    usages = certificate["spec"]["usages"]
    assert ("server auth" in usages) != ("client auth" in usages), usages
    return "server" if "server auth" in usages else "client"


def test_every_workload_of_the_example_runs_a_tunnel() -> None:
    assert sorted(t.workload for t in TUNNELS) == ["app", "postgres", "redis"]
    assert [t.workload for t in TUNNELS if t.sidecar] == ["app"]


@pytest.mark.parametrize("tunnel", TUNNELS, ids=lambda t: t.workload)
def test_the_configmap_tunnel_files_pass_tunnel_check_with_cert_manager_files(
    tunnel: TunnelContainer, tmp_path: Path
) -> None:
    """Certificates issued as the Certificate asks (CN, DNS names, server or client), in a
    volume laid out as the kubelet does with the manifest's defaultMode, and the tunnel
    files with only the mount's prefix moved under tmp_path."""
    ca = tmp_path / "ca"
    pki.init_ca(ca, name="tunnel CA")
    spec = tunnel.certificate["spec"]
    name = spec["commonName"]
    pki.issue(ca, name, kind=kind_of(tunnel.certificate), dns=spec.get("dnsNames", []))
    root = tmp_path / "pod"
    certs = root / tunnel.certs_mount.lstrip("/")
    certs.parent.mkdir(parents=True)
    files = {"tls.crt": (ca / f"{name}.crt").read_bytes(), "tls.key": (ca / f"{name}.key").read_bytes()}
    project(certs, {**files, "ca.crt": (ca / "ca.crt").read_bytes()}, mode=tunnel.default_mode)

    conf = root / "conf"
    conf.mkdir()
    for file_name, doc in tunnel.files.items():
        for key in ("cert", "key", "ca"):
            path = doc["tls"][key]
            assert path.startswith(tunnel.certs_mount + "/"), f"{file_name}: tls.{key} {path} is not in the mount"
            assert Path(path).name in CERT_MANAGER_KEYS
            doc["tls"][key] = str(root) + path
        (conf / file_name).write_text(yaml.safe_dump(doc))
        (conf / file_name).chmod(0o644)

    checked = subprocess.run([*TUNNEL, "check", str(conf)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count("ok:") == len(tunnel.files)


def test_clients_reach_server_tunnels_by_service_with_names_and_identities_that_match() -> None:
    services = of_kind("Service")
    servers = {t.workload: t for t in TUNNELS if kind_of(t.certificate) == "server"}
    [client] = [t for t in TUNNELS if kind_of(t.certificate) == "client"]
    for file_name, doc in client.files.items():
        assert doc["mode"] == "client"
        assert doc["listen"].startswith("127.0.0.1:"), "the application talks to 127.0.0.1"
        host, _, port = doc["target"].rpartition(":")
        service = services[host]["spec"]
        [server] = [s for s in servers.values() if service["selector"].items() <= labels(s).items()]
        [server_file] = server.files.values()
        listen_port = int(server_file["listen"].rpartition(":")[2])
        assert [p["port"] for p in service["ports"]] == [int(port)], f"{file_name}: {host} exposes the tunnel port only"
        assert port_number(server.container, service["ports"][0]["targetPort"]) == listen_port
        assert doc["tls"]["server_name"] in server.certificate["spec"]["dnsNames"]
        assert client.certificate["spec"]["commonName"] in server_file["allow"]["cn"]


def labels(tunnel: TunnelContainer) -> dict[str, str]:
    workloads = {**of_kind("Deployment"), **of_kind("StatefulSet")}
    return dict(workloads[tunnel.workload]["spec"]["template"]["metadata"]["labels"])


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


@pytest.mark.parametrize("tunnel", [t for t in TUNNELS if not t.sidecar], ids=lambda t: t.workload)
def test_databases_listen_on_loopback_and_no_service_reaches_them(tunnel: TunnelContainer) -> None:
    [server_file] = tunnel.files.values()
    target_port = int(server_file["target"].removeprefix("127.0.0.1:"))
    [database] = [c for c in tunnel.pod["containers"] if c is not tunnel.container]
    assert "127.0.0.1" in " ".join(database.get("args", [])), "the database binds loopback only"
    for service in of_kind("Service").values():
        if service["spec"]["selector"].items() <= labels(tunnel).items():
            for port in service["spec"]["ports"]:
                assert port_number(tunnel.container, port["targetPort"]) != target_port


@pytest.mark.parametrize("tunnel", TUNNELS, ids=lambda t: t.workload)
def test_tunnel_containers_are_confined_probed_and_bounded(tunnel: TunnelContainer) -> None:
    c, pod = tunnel.container, tunnel.pod
    security = c["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # The key is root:fsGroup 0440 (the kubelet adds group read): readable by the tunnel
    # through its group, by no other user; file_safety refuses a key every user can read.
    assert tunnel.default_mode == 0o440
    assert pod["securityContext"]["fsGroup"] == security["runAsGroup"]
    status = c["args"][c["args"].index("--status") + 1]
    status_port = int(status.rpartition(":")[2])
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert port_number(c, get["port"]) == status_port
    if tunnel.sidecar:
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz", "the application waits for the tunnel"
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= c["resources"]["limits"].keys()
