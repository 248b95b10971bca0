"""deploy/kubernetes/, checked offline: every manifest against the schemas of every Kubernetes
version kubernetes-validate ships (strict: no unknown field), the kustomization naming them all,
and what the manifests say held to regcache's own settings and ports."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions
from ruamel.yaml import YAML

from tests.support.parts import REPO
from regcache_core.config import DEFAULTS, ConfigError, parse_config

DEPLOY = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(path for path in DEPLOY.glob("*.yaml") if path.name != "kustomization.yaml")
VERSIONS = sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))
FILLED_SECRET = {"REGCACHE_CLUSTER_SECRET": "c" * 64, "REGCACHE_ADMIN_TOKEN": "t" * 64, "REDIS_PASSWORD": "p" * 32}
POD_IP = "10.42.1.7"


def documents(path: Path) -> list[dict]:
    return [document for document in YAML(typ="safe").load_all(path.read_text()) if document]


def resources() -> dict[tuple[str, str], dict]:
    """Every resource of the manifests, by (kind, name)."""
    return {(r["kind"], r["metadata"]["name"]): r for path in MANIFESTS for r in documents(path)}


def container(kind: str, name: str) -> dict:
    [only] = resources()[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return only


def expand(value: str, environment: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of an env value, from the variables defined before it."""
    for name, known in environment.items():
        value = value.replace(f"$({name})", known)
    return value


def regcache_environment(secret: dict[str, str]) -> dict[str, str]:
    """What `regcache up` sees in a pod: the ConfigMap, the Secret (with `secret`'s values), then
    the container's own env, expanded as the kubelet does."""
    regcache = container("Deployment", "regcache")
    sources = {"ConfigMap": resources()[("ConfigMap", "regcache")]["data"],
               "Secret": {**resources()[("Secret", "regcache")]["stringData"], **secret}}
    environment = {}
    for source in regcache["envFrom"]:
        [(kind, reference)] = [(k.removesuffix("Ref"), v) for k, v in source.items()]
        assert reference["name"] == "regcache"
        environment.update(sources[{"configMap": "ConfigMap", "secret": "Secret"}[kind]])
    for variable in regcache["env"]:
        if "value" in variable:
            environment[variable["name"]] = expand(variable["value"], environment)
        elif "secretKeyRef" in variable["valueFrom"]:
            environment[variable["name"]] = sources["Secret"][variable["valueFrom"]["secretKeyRef"]["key"]]
        else:
            assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            environment[variable["name"]] = POD_IP
    return environment


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_every_kubernetes_version_shipped(version):
    for path in MANIFESTS:
        for resource in documents(path):
            kubernetes_validate.validate(resource, version, strict=True)


def test_the_kustomization_names_every_manifest():
    [kustomization] = documents(DEPLOY / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(path.name for path in MANIFESTS)
    assert [image["name"] for image in kustomization["images"]] == [container("Deployment", "regcache")["image"]]


def test_the_settings_are_valid_and_agree_with_the_pod():
    environment = regcache_environment(FILLED_SECRET)
    config = parse_config({**DEFAULTS, **environment})
    regcache = container("Deployment", "regcache")
    ports = {port["name"]: port["containerPort"] for port in regcache["ports"]}
    assert (config.port, config.dataplane.port, config.admin_port) == (ports["registry"], ports["dataplane"], ports["admin"])
    # Each pod's 307s name its own address.
    assert config.dataplane.url == f"http://{POD_IP}:{ports['dataplane']}"
    mounts = {mount["name"]: Path(mount["mountPath"]) for mount in regcache["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in resources()[("Deployment", "regcache")]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "regcache-cache"
    assert resources()[("PersistentVolumeClaim", "regcache-cache")]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert config.data_dir == mounts["data"] and "emptyDir" in volumes["data"]
    for registry in config.registries:  # every cache is run in each pod, on the shared volume
        assert registry.cache.startswith("http://127.0.0.1:") and registry.storage.is_relative_to(mounts["cache"])
    assert config.max_disk is not None  # a budget: registry:2's own expiry then deletes nothing
    assert config.cluster.redis_url == f"redis://:{FILLED_SECRET['REDIS_PASSWORD']}@regcache-redis:6379/0"


def test_regcache_refuses_to_start_while_the_secret_is_empty():
    with pytest.raises(ConfigError, match="REGCACHE_CLUSTER_SECRET|REGCACHE_ADMIN_TOKEN"):
        parse_config({**DEFAULTS, **regcache_environment({})})


def test_probes_ask_the_admin_endpoint():
    regcache = container("Deployment", "regcache")
    for probe in ("startupProbe", "livenessProbe"):
        assert regcache[probe]["httpGet"] == {"path": "/live", "port": "admin"}
    command = " ".join(regcache["readinessProbe"]["exec"]["command"])
    admin_port = next(port["containerPort"] for port in regcache["ports"] if port["name"] == "admin")
    assert f"http://127.0.0.1:{admin_port}/ready" in command and "REGCACHE_ADMIN_TOKEN" in command


def test_the_service_and_the_disruption_budget_select_the_replicas_and_redis_evicts_nothing():
    everything = resources()
    pod_labels = everything[("Deployment", "regcache")]["spec"]["template"]["metadata"]["labels"]
    assert everything[("Service", "regcache")]["spec"]["selector"] == pod_labels
    assert everything[("PodDisruptionBudget", "regcache")]["spec"]["selector"]["matchLabels"] == pod_labels
    assert [port["port"] for port in everything[("Service", "regcache")]["spec"]["ports"]] == [5000, 5050]
    redis_labels = everything[("Deployment", "regcache-redis")]["spec"]["template"]["metadata"]["labels"]
    assert everything[("Service", "regcache-redis")]["spec"]["selector"] == redis_labels
    args = container("Deployment", "regcache-redis")["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
