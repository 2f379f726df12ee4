"""deploy/kubernetes/: the manifests parse, and say what the README says (issue 23 §4).

N replicas in a Deployment, a PodDisruptionBudget over the same pods, probes on /livez and
/readyz at the config's metrics port, the PIN and the database URL from Secrets (files, never
the environment or argv), one token directory shared and one audit log per pod. The shared
signerd.toml is parsed by signerd's own config loader.
"""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from signerd.config import Config, parse_config

KUBE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def _documents() -> dict[str, list[dict[str, Any]]]:
    """Every manifest by kind (kustomization.yaml included)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and "kind" in doc, path
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict[str, Any]]]:
    return _documents()


def _one(docs: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (doc,) = docs[kind]
    return doc


@pytest.fixture(scope="module")
def pod(docs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def signerd(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["containers"] if c["name"] == "signerd"]
    return container


@pytest.fixture(scope="module")
def config(docs: dict[str, list[dict[str, Any]]]) -> Config:
    data = _one(docs, "ConfigMap")["data"]
    return parse_config(tomllib.loads(data["signerd.toml"]), Path("/etc/signerd/config"))


def _mount_of(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount of ``container`` that holds ``path`` (the longest match)."""
    mounts = [m for m in container["volumeMounts"]
              if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"nothing mounted at {path}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    return volume


def test_kustomization_lists_every_manifest(docs: dict[str, list[dict[str, Any]]]) -> None:
    listed = set(_one(docs, "Kustomization")["resources"])
    assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}


def test_replicas_and_a_disruption_budget_over_the_same_pods(
        docs: dict[str, list[dict[str, Any]]]) -> None:
    deployment = _one(docs, "Deployment")
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < replicas
    else:
        assert 1 <= pdb["spec"]["minAvailable"] < replicas
    service = _one(docs, "Service")
    assert service["spec"]["selector"] == selector


def test_probes_are_livez_and_readyz_on_the_metrics_port(signerd: dict[str, Any],
                                                         config: Config) -> None:
    ports = {p["name"]: p["containerPort"] for p in signerd["ports"]}
    assert config.metrics_listen is not None and config.listen is not None
    assert ports["metrics"] == int(config.metrics_listen.rsplit(":", 1)[1])
    assert ports["grpc"] == int(config.listen.rsplit(":", 1)[1])
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = signerd[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "metrics"), probe


def test_the_pin_comes_from_a_secret_file(pod: dict[str, Any], signerd: dict[str, Any],
                                          config: Config) -> None:
    for token in config.tokens:
        assert token.pin_file is not None
        mount = _mount_of(signerd, str(token.pin_file))
        assert mount.get("readOnly") is True
        assert "secretName" in _volume(pod, mount["name"])["secret"]
    names = {e["name"] for c in [*pod["containers"], *pod["initContainers"]]
             for e in c.get("env", [])}
    assert not any("PIN" in n.upper() for n in names)


def test_the_database_url_comes_from_a_secret_file(
        docs: dict[str, list[dict[str, Any]]], pod: dict[str, Any],
        signerd: dict[str, Any]) -> None:
    shared = tomllib.loads(_one(docs, "ConfigMap")["data"]["signerd.toml"])
    assert "state" not in shared  # never in the ConfigMap
    command = signerd["command"]
    config_file = command[command.index("--config") + 1]
    run = _mount_of(signerd, config_file)
    assert "emptyDir" in _volume(pod, run["name"])
    (init,) = pod["initContainers"]
    script = " ".join(init["command"])
    state_mount = next(m for m in init["volumeMounts"]
                       if "secret" in _volume(pod, m["name"]))
    assert f"{state_mount['mountPath']}/state.toml" in script and config_file in script
    assert _volume(pod, state_mount["name"])["secret"]["secretName"] == "signerd-state"
    everything = yaml.safe_dump_all([d for ds in docs.values() for d in ds])
    assert "postgresql://" not in everything and "postgres://" not in everything


def test_the_token_is_shared_and_each_pod_has_its_own_audit_log(
        docs: dict[str, list[dict[str, Any]]], pod: dict[str, Any], signerd: dict[str, Any],
        config: Config) -> None:
    softhsm = _one(docs, "ConfigMap")["data"]["softhsm2.conf"]
    (tokendir,) = [line.split("=", 1)[1].strip() for line in softhsm.splitlines()
                   if line.startswith("directories.tokendir")]
    tokens = _mount_of(signerd, tokendir)
    claim = _volume(pod, tokens["name"])["persistentVolumeClaim"]["claimName"]
    claims = {c["metadata"]["name"]: c for c in docs["PersistentVolumeClaim"]}
    assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert config.audit_file is not None
    audit = _mount_of(signerd, str(config.audit_file))
    assert audit["subPathExpr"] == "$(POD_NAME)"
    (pod_name,) = [e for e in signerd["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_pod_runs_unprivileged(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in [*pod["containers"], *pod["initContainers"]]:
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
