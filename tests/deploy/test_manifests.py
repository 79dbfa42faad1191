"""The image and the Kubernetes manifests, checked offline.

hadolint lints the Dockerfile; kubernetes-validate checks every manifest
against the Kubernetes schemas (strict: unknown fields fail); kustomize
(``kubectl kustomize``, when kubectl is installed) renders both entry
points, and the rendered output is validated too. The rest checks what
the schemas cannot: that the pieces fit the relay (probes, drain timing,
settings the relay accepts, tokens it can load).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.auth import load_authenticator
from relay.cli import DRAIN_GRACE_SECONDS
from relay.config import load_settings
from relay.connections import RETRY_BUDGET_SECONDS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests support


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install '.[test]' brings it)")
    return found


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(kind: str, name: str) -> dict[str, Any]:
    for path in manifests():
        for doc in docs(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} under k8s/")


# --- Dockerfile -----------------------------------------------------------------


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_pinned_non_root_and_installs_from_project_metadata() -> None:
    text = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases and all(re.search(r":\d+\.\d+\.\d+", b) or "@sha256:" in b for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), users
    assert re.search(r"pip install [^\n]*\s\.\s", text), "dependencies come from pyproject.toml"
    assert 'ENTRYPOINT ["relay"]' in text and 'CMD ["serve"]' in text
    ignored = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignored[0] == "*", ".dockerignore starts from nothing and lists what goes in"
    assert "!.venv" not in ignored and "!tests/" not in ignored


# --- schemas -------------------------------------------------------------------------


def test_every_manifest_passes_the_kubernetes_schemas() -> None:
    result = subprocess.run(
        [
            tool("kubernetes-validate"),
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
            *map(str, manifests()),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomizations_list_every_manifest_once() -> None:
    listed: list[Path] = []
    for kustomization in kustomizations():
        spec = yaml.safe_load(kustomization.read_text())
        for entry in spec.get("resources", []):
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            if target.is_file():
                listed.append(target)
    assert sorted(listed) == manifests(), "a manifest no kustomization applies, or one twice"


@pytest.mark.parametrize("entry", ["", "external-redis"])
def test_kustomize_renders_valid_manifests(entry: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the file-level checks above still ran")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S / entry)], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    objects = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Deployment", "relay") in kinds and ("Deployment", "relay-worker") in kinds
    assert (("StatefulSet", "redis") in kinds) == (entry == "")
    assert all(
        o["metadata"].get("namespace") == "llm-relay" for o in objects if o["kind"] != "Namespace"
    )
    images = {
        c["image"]
        for o in objects
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"ghcr.io/your-org/llm-relay:0.1.0"}
    validated = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(out)],
        capture_output=True,
        text=True,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr


# --- the pieces fit the relay ---------------------------------------------------------


def test_relay_deployment_drains_within_its_grace_period() -> None:
    relay = find("Deployment", "relay")
    assert relay["spec"]["replicas"] == 3
    assert relay["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = relay["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause >= 5, "endpoints must drop the pod before it stops"
    # preStop pause, then the relay's own drain grace, then its shutdown.
    assert pod["terminationGracePeriodSeconds"] >= pause + DRAIN_GRACE_SECONDS + 10
    # A Sentinel failover must not restart replicas: liveness ignores Redis,
    # and readiness tolerates the few seconds of a failover.
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= RETRY_BUDGET_SECONDS


def test_worker_pdb_hpa_and_ingress_are_there() -> None:
    worker = find("Deployment", "relay-worker")
    assert worker["spec"]["replicas"] == 2
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    assert find("PodDisruptionBudget", "relay")["spec"]["maxUnavailable"] == 1
    hpa = find("HorizontalPodAutoscaler", "relay")["spec"]
    assert hpa["minReplicas"] >= 3 and hpa["scaleTargetRef"]["name"] == "relay"
    notes = find("Ingress", "relay")["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600


def test_the_relay_accepts_the_configmap_and_loads_the_example_tokens(tmp_path: Path) -> None:
    env = dict(find("ConfigMap", "relay-config")["data"])
    tokens = find("Secret", "relay-tokens")["stringData"]["tokens.yaml"]
    (tmp_path / "tokens.yaml").write_text(tokens)
    env.update(RELAY_REPLICA_ID="relay-7d9f-abcde", RELAY_TOKENS_FILE=str(tmp_path / "tokens.yaml"))
    settings = load_settings(environ=env)  # ConfigError on any unknown or bad RELAY_*
    assert settings.redis_sentinels and settings.redis_master_name == "relay"
    auth = load_authenticator(settings.tokens_file, None, False)
    admin = auth.principal_for("example-admin-token-CHANGE-ME")
    assert admin is not None and "admin" in admin.scopes


def test_sentinel_fails_over_within_the_relays_retry_budget() -> None:
    script = find("ConfigMap", "redis-config")["data"]["init.sh"]
    down_after = int(re.search(r"down-after-milliseconds \S+ (\d+)", script).group(1))  # type: ignore[union-attr]
    assert "sentinel monitor ${MASTER_NAME} ${MASTER} 6379 2" in script
    # Detection plus about a second of election and promotion.
    assert down_after / 1000 + 2 <= RETRY_BUDGET_SECONDS
    redis = find("StatefulSet", "redis")["spec"]
    assert redis["replicas"] == 3
    assert {c["name"] for c in redis["template"]["spec"]["containers"]} == {"redis", "sentinel"}
