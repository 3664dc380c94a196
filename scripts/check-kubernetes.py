"""Validate deploy/kubernetes/ offline: every manifest against a pinned Kubernetes version.

    python scripts/check-kubernetes.py KUBERNETES_VERSION [DIR]

Run by scripts/check-deploy.sh (step 7) with the .venv-tools interpreter, which has
kubernetes-validate (PyPI, pinned there): the OpenAPI schemas of the core API for each
Kubernetes release, bundled in the package, used in strict mode (an unknown field fails,
as `kubectl apply --validate=strict` would refuse it).

Kinds from CustomResourceDefinitions (cert-manager's Issuer and Certificate, the Prometheus
Operator's ServiceMonitor) have no schema there, and kubernetes-validate takes no schema
from elsewhere: their CRDs' schemas live in those projects' release manifests, which CI
cannot download. So they are skipped by kubernetes-validate, said so by name, and checked
here instead for the fields this example uses: no key outside those the projects' API
references list (cert-manager.io/v1, monitoring.coreos.com/v1), the required ones present,
and the values the example depends on (durations, usages, rotationPolicy Always).

Also: kustomization.yaml lists exactly the other manifests. That every tunnel file in a
ConfigMap passes `tunnel check` with the certificates cert-manager would write, where the
pods mount them, is a test: tests/e2e/test_kubernetes_manifests.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

CRD_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
# The keys each CRD kind's spec may have, from the projects' API references (a subset
# where the example uses a subset: a key outside it is a typo or needs adding here).
CERTIFICATE_SPEC = {
    "secretName",
    "issuerRef",
    "commonName",
    "dnsNames",
    "ipAddresses",
    "uris",
    "emailAddresses",
    "subject",
    "duration",
    "renewBefore",
    "usages",
    "privateKey",
    "isCA",
    "secretTemplate",
    "revisionHistoryLimit",
}
PRIVATE_KEY = {"algorithm", "size", "encoding", "rotationPolicy"}
ISSUER_REF = {"name", "kind", "group"}
USAGES = {
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
}
SERVICE_MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
ENDPOINT = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings"}
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(h|m|s|ms))+$")


def unknown(
    where: str, got: dict[str, Any], allowed: set[str], required: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    problems = [f"{where}: unknown key {key!r}" for key in got if key not in allowed]
    problems += [f"{where}: {key} is required" for key in required if key not in got]
    return problems


def check_crd_kind(doc: dict[str, Any]) -> list[str]:
    kind, spec = doc["kind"], doc.get("spec") or {}
    where = f"{kind}/{doc['metadata']['name']}"
    if kind == "Issuer":
        problems = unknown(f"{where}.spec", spec, {"ca"}, {"ca"})
        return problems + unknown(
            f"{where}.spec.ca",
            spec.get("ca") or {},
            {"secretName", "crlDistributionPoints", "ocspServers"},
            {"secretName"},
        )
    if kind == "Certificate":
        problems = unknown(f"{where}.spec", spec, CERTIFICATE_SPEC, {"secretName", "issuerRef"})
        problems += unknown(f"{where}.spec.issuerRef", spec.get("issuerRef") or {}, ISSUER_REF, {"name"})
        key = spec.get("privateKey") or {}
        problems += unknown(f"{where}.spec.privateKey", key, PRIVATE_KEY)
        if key.get("rotationPolicy") != "Always":
            problems.append(f"{where}.spec.privateKey.rotationPolicy: want Always (a new key with each renewal)")
        for field in ("duration", "renewBefore"):
            if not GO_DURATION.match(str(spec.get(field, ""))):
                problems.append(f"{where}.spec.{field}: {spec.get(field)!r} is not a Go duration (24h, 8h)")
        problems += [f"{where}.spec.usages: unknown usage {u!r}" for u in spec.get("usages", []) if u not in USAGES]
        return problems
    problems = unknown(f"{where}.spec", spec, SERVICE_MONITOR_SPEC, {"selector", "endpoints"})
    for n, endpoint in enumerate(spec.get("endpoints", [])):
        problems += unknown(f"{where}.spec.endpoints[{n}]", endpoint, ENDPOINT)
    return problems


def main(version: str, directory: Path) -> int:
    problems: list[str] = []
    manifests = sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    listed = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
    if sorted(listed) != [p.name for p in manifests]:
        problems.append(f"kustomization.yaml lists {sorted(listed)}, the directory has {[p.name for p in manifests]}")
    counts = {"validated": 0, "crd": 0}
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            kind = (doc["apiVersion"], doc["kind"])
            label = f"{path.name}: {doc['kind']}/{doc['metadata']['name']}"
            if kind in CRD_KINDS:
                found = check_crd_kind(doc)
                problems += [f"{path.name}: {p}" for p in found]
                print(f"skipped by kubernetes-validate (a CRD kind, no schema in it): {label}; fields checked here")
                counts["crd"] += 1
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                at = ".".join(str(p) for p in e.path)
                problems.append(f"{label}: {at}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{label}: {e.message}")
            else:
                counts["validated"] += 1
    if problems:
        print("\n".join(f"FAIL: {p}" for p in problems), file=sys.stderr)
        return 1
    print(
        f"ok: {counts['validated']} objects valid for Kubernetes {version} (kubernetes-validate "
        f"{kubernetes_validate.__version__}, strict); {counts['crd']} CRD objects checked by hand; "
        "kustomization.yaml lists every manifest"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "deploy/kubernetes")))
