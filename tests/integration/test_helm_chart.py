"""The Helm chart, offline, with the real Helm engine (helm-python-sdk embeds Helm v4).

For the default values and every helm/sandboxd/ci/*.yaml: strict lint, render, validation of
every manifest against the Kubernetes schemas of several versions (kubernetes-validate), the
custom resources against the fields their CRDs require, the rendered sandboxd.toml (with the
environment the chart gives a pod) loaded by the daemon's own settings code, the socket directory
seen alike by the daemon and the engine, hand-off identities, the workspace-store claim, the
NetworkPolicy's ports, secure defaults on every container we own, and a checkov scan. Every
helm/bad-values/*.yaml must be rejected, by the schema or by a `fail` in _helpers.tpl, with the
message its `# expect:` line names, and every `fail` must be reached by one of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Hard imports: a missing test dependency fails the suite; it never skips it.
import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from sandboxd import assembly
from sandboxd.settings import SECRET_FIELDS, Settings, load_settings
from tests.conftest import REPO

CHART = REPO / "helm" / "sandboxd"
BAD_VALUES = sorted((REPO / "helm" / "bad-values").glob("*.yaml"))
VALUE_SETS: dict[str, Path | None] = {"default": None} | {p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion: native sidecars), one in the
# middle, and the newest kubernetes-validate ships.
KUBE_VERSIONS = ("1.29.0", "1.33.0", "1.37.0")
RELEASE, NAMESPACE = "sbx", "sandboxd"
# Settings the chart derives from values of its own (camelCase value -> setting).
CHART_VALUE_SETTINGS = {
    "networkMode": "network_mode",
    "egress.allowedHosts": "egress_allowed_hosts",
    "egress.audit": "egress_audit",
    "shutdownMode": "shutdown_mode",
    "warmPoolSize": "warm_pool_size",
    "warmPoolMaxAgeSeconds": "warm_pool_max_age_seconds",
    "workspaceRetentionSeconds": "workspace_retention_seconds",
    "workspaceStoreMaxBytes": "workspace_store_max_bytes",
}
# Settings the chart sets itself; values.config may not (values.schema.json), secrets never.
CHART_MANAGED_SETTINGS = {"environment_id", "image", "runtime_image", "state_dir", "metrics_address", "socket_dir",
                          "workspace_store_dir", *CHART_VALUE_SETTINGS.values(), *SECRET_FIELDS}
# Containers in our pods that are not ours: the Docker engine sidecar (Docker's image).
NOT_OURS = {"dind"}
# checkov findings accepted for the whole chart, each with why. Nothing else may fail.
CHECKOV_ACCEPTED = {
    # Digests are per deployment (your registry's builds); the chart takes image.digest,
    # sandboxImage.digest and docker.dind.image.digest, and defaults to release-pinned tags.
    # ci/dind-rootful-values.yaml pins every image by digest and passes this check.
    "CKV_K8S_43": "images are pinned by tag by default; digests are supported",
}
# ... and those accepted for our own container in one docker mode only.
CHECKOV_ACCEPTED_BY_MODE = {
    # hostSocket mode exists to mount the node's Docker socket; NOTES.txt warns that it is root.
    "hostSocket": {"CKV_K8S_27": "hostSocket mode mounts the node's Docker socket by design"},
}

helm.disable_logging()


def load_values(path: Path | None) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path else None


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@cache
def render(name: str) -> dict[str, str]:
    """template path -> rendered text, for a value set."""
    return _chart().render(load_values(VALUE_SETS[name]), name=RELEASE, namespace=NAMESPACE)


def manifests(name: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(name).items()):
        if not path.endswith("NOTES.txt"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def one(name: str, kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d for d in manifests(name)
        if d["kind"] == kind
        and component in (None, d["metadata"]["labels"].get("app.kubernetes.io/component"))
    ]
    assert len(found) == 1, f"{name}: expected one {kind} ({component}), found {len(found)}"
    return found[0]


def docker_mode(name: str) -> str:
    return str(_chart().merge_values(load_values(VALUE_SETS[name]))["docker"]["mode"])


def pod_specs(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in manifests(name):
        if doc["kind"] == "Deployment":
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def owned_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] not in NOT_OURS]


value_sets = pytest.mark.parametrize("value_set", list(VALUE_SETS))


# --- lint, render, Kubernetes schemas -------------------------------------------------------------


def test_ci_value_sets_cover_every_docker_mode() -> None:
    modes = {docker_mode(name) for name in VALUE_SETS if name != "default"}
    assert modes == {"dind", "hostSocket", "external"}
    rootless = {bool(_chart().merge_values(load_values(VALUE_SETS[n]))["docker"]["dind"]["rootless"])
                for n in VALUE_SETS if n != "default" and docker_mode(n) == "dind"}
    assert rootless == {True, False}, "ci/ must cover both rootless and root dind"


def test_ci_value_sets_cover_the_lifecycle_combinations() -> None:
    """Every combination this round's settings allow has a value set that is rendered and scanned."""
    merged = {n: _chart().merge_values(load_values(VALUE_SETS[n])) for n in VALUE_SETS}

    def covered(check: Any) -> bool:
        return any(check(v, docker_mode(n)) for n, v in merged.items())

    assert covered(lambda v, m: v["warmPoolSize"] == 0), "no warm pool"
    assert covered(lambda v, m: v["shutdownMode"] == "handoff" and m == "hostSocket"), "handoff, hostSocket"
    assert covered(lambda v, m: v["shutdownMode"] == "handoff" and m == "external"), "handoff, external"
    assert covered(lambda v, m: v["workspaceStore"]["existingClaim"]), "store on an existing claim"
    assert covered(lambda v, m: v["workspaceStore"]["create"]), "store on a created claim"
    assert covered(lambda v, m: v["egress"]["allowedHosts"] and v["egress"]["audit"]), "egress allow-list, audit"
    assert covered(lambda v, m: m == "external" and v["networkMode"] == "host"), "external, host network"
    assert merged["default"]["networkMode"] == "none" and merged["default"]["shutdownMode"] == "drain"


@value_sets
@pytest.mark.parametrize("kube_version", [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]])
def test_lint_is_clean_in_strict_mode(value_set: str, kube_version: str) -> None:
    report = helm.lint(CHART, load_values(VALUE_SETS[value_set]), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; 1 is info
    assert not report["errors"] and not problems, json.dumps(report, indent=2)


def test_kubernetes_versions_are_supported_by_the_validator() -> None:
    minor = kubernetes_validate.utils.major_minor
    supported = {minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert {minor(v) for v in KUBE_VERSIONS} <= supported
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"


@value_sets
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(value_set: str, kube_version: str) -> None:
    checked = 0
    for doc in manifests(value_set):
        if doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue  # test_custom_resources_have_the_shape_their_crds_require
        kubernetes_validate.validate(doc, kube_version, strict=True)
        checked += 1
    assert checked >= 6


def test_the_validator_rejects_an_unknown_field() -> None:
    """The check above can fail: strict validation refuses a field Kubernetes does not know."""
    deployment = json.loads(json.dumps(one("default", "Deployment", "daemon")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
_META = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STR_MAP}}
# The fields of each CRD the chart uses, with the CRD's types (prometheus-operator v0.7x, KEDA 2.x).
CUSTOM_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                     "properties": {
                "selector": {"type": "object", "required": ["matchLabels"], "properties": {"matchLabels": _STR_MAP}},
                "namespaceSelector": {"type": "object", "properties": {
                    "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"], "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": _DURATION, "scrapeTimeout": _DURATION}}},
            }},
        },
    },
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
                "groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "rules"], "additionalProperties": False, "properties": {
                        "name": {"type": "string"}, "interval": _DURATION,
                        "rules": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["expr"], "additionalProperties": False,
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {
                                "alert": {"type": "string"}, "record": {"type": "string"},
                                "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                                "labels": _STR_MAP, "annotations": _STR_MAP}}}}}},
            }},
        },
    },
    "ScaledObject": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
                     "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object", "properties": {"horizontalPodAutoscalerConfig": {
                    "type": "object", "properties": {"behavior": {"type": "object"}}}}},
                # KEDA wants every trigger metadata value as a string.
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False, "properties": {
                        "type": {"type": "string"}, "metadata": _STR_MAP,
                        "authenticationRef": {"type": "object", "required": ["name"]}}}},
            }},
        },
    },
}
CUSTOM_GROUPS = {"monitoring.coreos.com", "keda.sh"}


@value_sets
def test_custom_resources_have_the_shape_their_crds_require(value_set: str) -> None:
    for doc in manifests(value_set):
        if doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            jsonschema.validate(doc, CUSTOM_SCHEMAS[doc["kind"]])


def test_optional_resources_render_when_enabled() -> None:
    kinds = {d["kind"] for d in manifests("default")}
    assert kinds == {"ConfigMap", "Secret", "ServiceAccount", "Deployment", "Service", "PodDisruptionBudget",
                     "NetworkPolicy"}
    full = manifests("dind-rootless-values")
    assert {d["kind"] for d in full} >= {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
    assert len([d for d in full if d["kind"] == "Deployment"]) == 2  # the daemons and the exporter
    # KEDA owns the replica count: the Deployment must not fight it.
    assert "replicas" not in one("dind-rootless-values", "Deployment", "daemon")["spec"]
    scaled = one("dind-rootless-values", "ScaledObject")["spec"]
    assert scaled["triggers"][0]["metadata"]["query"] == 'max(sandboxd_queue_depth{environment_id="env_01ci"})'
    assert scaled["triggers"][0]["metadata"]["threshold"] == "8"  # config.max_sessions
    assert "Secret" not in {d["kind"] for d in manifests("dind-rootful-values")}  # existingSecret


def test_prometheus_rule_carries_the_monitoring_alerts() -> None:
    """One copy of the alerts: files/prometheus-rules.yaml links monitoring/prometheus-rules.yaml."""
    source = yaml.safe_load((REPO / "monitoring" / "prometheus-rules.yaml").read_text())
    assert one("dind-rootless-values", "PrometheusRule")["spec"]["groups"] == source["groups"]


# --- what the daemon reads: its config file and its credentials ------------------------------------


@value_sets
def test_rendered_config_is_accepted_by_the_daemon(value_set: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SANDBOXD_") or n == "CREDENTIALS_DIRECTORY"]:
        monkeypatch.delenv(name)
    config = tmp_path / "sandboxd.toml"
    config.write_text(one(value_set, "ConfigMap")["data"]["sandboxd.toml"])
    settings = load_settings([], prog="sandboxd run", config_file=str(config), secrets_dir=[tmp_path / "none"])
    values = _chart().merge_values(load_values(VALUE_SETS[value_set]))
    assert settings.environment_id == (values["environmentId"] or None)
    assert settings.max_sessions == values["config"]["max_sessions"]
    tag = values["sandboxImage"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert settings.image == f"{values['sandboxImage']['repository']}:{tag}"
    assert settings.environment_key is None and settings.api_key is None


def value_at(values: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        values = values[key]
    return values


# What the downward API would give one pod, to expand the $(VAR)s of the daemon's environment.
FAKE_POD = {"POD_NAME": "sbx-sandboxd-5f7c9d8b7c-x2x4z", "NODE_NAME": "node-a.example.internal"}


def daemon_container(value_set: str) -> dict[str, Any]:
    spec = one(value_set, "Deployment", "daemon")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "sandboxd")


def daemon_settings(value_set: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings one daemon pod builds: its sandboxd.toml plus the environment the chart gives it."""
    for name in [n for n in os.environ if n.startswith("SANDBOXD_") or n == "CREDENTIALS_DIRECTORY"]:
        monkeypatch.delenv(name)
    env = dict(FAKE_POD)
    for var in daemon_container(value_set)["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
            if var["name"].startswith("SANDBOXD_"):
                monkeypatch.setenv(var["name"], env[var["name"]])
    config = tmp_path / "sandboxd.toml"
    config.write_text(one(value_set, "ConfigMap")["data"]["sandboxd.toml"])
    return load_settings([], prog="sandboxd run", config_file=str(config), secrets_dir=[tmp_path / "none"])


@value_sets
def test_chart_values_reach_the_daemons_settings(value_set: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = daemon_settings(value_set, tmp_path, monkeypatch)
    values = _chart().merge_values(load_values(VALUE_SETS[value_set]))
    for value, setting in CHART_VALUE_SETTINGS.items():
        assert getattr(settings, setting) == value_at(values, value), f"{value} -> {setting}"
    # The broker and proxy exactly when sandboxes have no network; a socket path the daemon accepts.
    # (Without the credential rules: their secret files and the proxy's CA are the pod's, read at start.)
    ways_out = assembly.channels(settings.model_copy(update={"egress_credentials": []}))
    assert (ways_out is None) == (values["networkMode"] != "none")
    store = values["workspaceStore"]
    if store["existingClaim"] or store["create"]:
        assert settings.workspace_store_dir == Path(store["mountPath"]) / "workspaces"
    else:
        assert settings.workspace_store_dir is None  # <state_dir>/workspaces, pod-local


def test_egress_credentials_reach_the_daemon_as_mounted_files(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    settings = daemon_settings("egress-allowlist-values", tmp_path, monkeypatch)
    (credential,) = settings.egress_credentials
    assert (credential.name, credential.host, credential.port, credential.format) == (
        "git", "git.example.internal", 8443, "basic")
    mounts = {m["mountPath"] for m in daemon_container("egress-allowlist-values")["volumeMounts"]}
    assert str(credential.secret_file.parent) in mounts


@value_sets
def test_socket_dir_is_the_same_directory_for_the_engine(value_set: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine bind-mounts socket_dir into sandboxes: the path must name, on the engine's
    filesystem, the directory the daemon serves its sockets in."""
    settings = daemon_settings(value_set, tmp_path, monkeypatch)
    mode = docker_mode(value_set)
    spec = one(value_set, "Deployment", "daemon")["spec"]["template"]["spec"]
    daemon = {m["name"]: m["mountPath"] for m in daemon_container(value_set)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if mode == "external":
        assert "channels" not in volumes and settings.socket_dir is None
        return
    assert settings.socket_dir is not None
    mount = daemon["channels"]
    # A directory the daemon creates below the mount, so it owns it and may set its mode.
    assert settings.socket_dir.parent == Path(mount)
    if mode == "dind":
        (dind,) = spec["initContainers"]
        assert {m["name"]: m["mountPath"] for m in dind["volumeMounts"]}["channels"] == mount
        assert "emptyDir" in volumes["channels"]
        assert not mount.startswith(("/run/", "/etc/"))  # rootless dind copies those up
    else:
        assert volumes["channels"]["hostPath"] == {"path": mount, "type": "Directory"}
    handoff = _chart().merge_values(load_values(VALUE_SETS[value_set]))["shutdownMode"] == "handoff"
    if mode == "hostSocket":
        # Per pod, or with handoff per node (one pod per node), where the successor serves again.
        assert settings.socket_dir.name == ("handoff" if handoff else FAKE_POD["POD_NAME"])


@value_sets
def test_handoff_gives_the_successor_the_same_identity(value_set: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The successor of a pod adopts what it left only under the same instance name."""
    values = _chart().merge_values(load_values(VALUE_SETS[value_set]))
    settings = daemon_settings(value_set, tmp_path, monkeypatch)
    spec = one(value_set, "Deployment", "daemon")["spec"]["template"]["spec"]
    if values["shutdownMode"] != "handoff":
        assert settings.worker_id == values["config"].get("worker_id")  # the hostname: one pod, one instance
        return
    mode = docker_mode(value_set)
    assert mode != "dind"
    expected = f"{NAMESPACE}-{RELEASE}-sandboxd" + (f"-{FAKE_POD['NODE_NAME']}" if mode == "hostSocket" else "")
    assert settings.worker_id == expected and assembly.instance_name(settings) == expected
    strategy = one(value_set, "Deployment", "daemon")["spec"]["strategy"]
    assert strategy["type"] == "Recreate" or str(strategy["rollingUpdate"]["maxSurge"]) in {"0", "0%"}
    if mode == "hostSocket":
        terms = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {
            "app.kubernetes.io/name": "sandboxd", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "daemon"}}} in terms
        assert spec["affinity"]["nodeAffinity"] == values["affinity"]["nodeAffinity"]  # values kept
    else:
        assert one(value_set, "Deployment", "daemon")["spec"]["replicas"] == 1


@value_sets
def test_workspace_store_claim_is_mounted(value_set: str) -> None:
    values = _chart().merge_values(load_values(VALUE_SETS[value_set]))
    store = values["workspaceStore"]
    claims = [d for d in manifests(value_set) if d["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in one(value_set, "Deployment", "daemon")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in daemon_container(value_set)["volumeMounts"]}
    if not (store["existingClaim"] or store["create"]):
        assert not claims and "workspace-store" not in volumes
        return
    name = store["existingClaim"] or f"{RELEASE}-sandboxd-workspaces"
    assert volumes["workspace-store"]["persistentVolumeClaim"] == {"claimName": name}
    assert mounts["workspace-store"] == store["mountPath"]
    if store["existingClaim"]:
        assert not claims
    else:
        (claim,) = claims
        assert claim["metadata"]["name"] == name
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claim["spec"]["resources"]["requests"]["storage"] == store["size"]
        assert claim["spec"].get("storageClassName", "") == store["storageClassName"]
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@value_sets
def test_network_policy_follows_the_network_mode(value_set: str) -> None:
    values = _chart().merge_values(load_values(VALUE_SETS[value_set]))
    egress = one(value_set, "NetworkPolicy")["spec"]["egress"]
    anywhere = next(rule for rule in egress if "to" in rule)
    assert {b["ipBlock"]["cidr"] for b in anywhere["to"]} == {"0.0.0.0/0", "::/0"}
    assert anywhere["to"][0]["ipBlock"]["except"] == values["networkPolicy"]["egressExcept"]  # no metadata
    if values["networkMode"] != "none":
        assert egress == [anywhere] and "ports" not in anywhere  # opted out: sandboxes need any port
        return
    dns = next(rule for rule in egress if "to" not in rule)
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    ports = {p["port"] for p in anywhere["ports"]}
    expected = {443, *values["networkPolicy"]["egressPorts"]}
    for url in (values["config"].get("base_url"), values["config"].get("sandbox_base_url")):
        if url:
            parsed = urlsplit(url)
            expected.add(parsed.port or (80 if parsed.scheme == "http" else 443))
    if docker_mode(value_set) == "external":
        expected.add(int(values["docker"]["external"]["host"].rsplit(":", 1)[1]))
    if values["config"].get("git_ssh_key_files"):
        expected.add(22)
    for entry in values["egress"]["allowedHosts"]:
        match = re.search(r":(\d+)$", entry)
        expected.add(int(match.group(1)) if match else 80)
    assert ports == expected


def test_schema_knows_every_daemon_setting() -> None:
    """values.config is checked against the daemon's own settings: no more, no fewer."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    assert set(config["properties"]) == set(Settings.model_fields) - CHART_MANAGED_SETTINGS


@value_sets
def test_credentials_are_files_and_only_where_needed(value_set: str) -> None:
    values = _chart().merge_values(load_values(VALUE_SETS[value_set]))
    for name, spec in pod_specs(value_set):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), f"{name}: secret as env var {env['name']}"
        files = set()
        for volume in spec["volumes"]:
            if volume["name"] == "credentials":
                sources = volume.get("projected", {}).get("sources", [{"secret": volume.get("secret")}])
                files |= {item["path"] for source in sources for item in source["secret"]["items"]}
        if name.endswith("-exporter"):
            assert files == {"api_key"}, "the exporter holds the API key only"
        else:
            assert files == ({"environment_key", "api_key"} if values["mountApiKey"] else {"environment_key"})
        assert spec["automountServiceAccountToken"] is False


# --- security ------------------------------------------------------------------------------------


@value_sets
def test_our_containers_have_secure_defaults(value_set: str) -> None:
    for name, spec in pod_specs(value_set):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in owned_containers(spec):
            ctx = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10002, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False and ctx.get("privileged", False) is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", where
            assert {"livenessProbe", "readinessProbe"} <= container.keys(), where
            assert {"requests", "limits"} <= container["resources"].keys(), where


@value_sets
def test_grace_period_outlasts_the_daemons_shutdown(value_set: str) -> None:
    values = _chart().merge_values(load_values(VALUE_SETS[value_set]))
    spec = one(value_set, "Deployment", "daemon")["spec"]["template"]["spec"]
    grace = values["config"].get("shutdown_grace_seconds", 60) + values["config"].get("stop_timeout_seconds", 10)
    assert spec["terminationGracePeriodSeconds"] > grace


@pytest.mark.parametrize("value_set", ["dind-rootless-values", "dind-rootful-values"])
def test_dind_is_a_native_sidecar_sharing_the_state_path(value_set: str) -> None:
    spec = one(value_set, "Deployment", "daemon")["spec"]["template"]["spec"]
    rootless = "rootless" in value_set
    (dind,) = spec["initContainers"]
    daemon = next(c for c in spec["containers"] if c["name"] == "sandboxd")
    assert dind["restartPolicy"] == "Always" and "startupProbe" in dind  # up before, down after the daemon
    assert dind["securityContext"]["privileged"] is True
    assert dind["securityContext"]["runAsUser"] == (1000 if rootless else 0)
    assert ("rootless" in dind["image"]) == rootless or "@sha256:" in dind["image"]
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]} for c in (dind, daemon)}
    # The state emptyDir at the same path in both, so any path the daemon names resolves alike.
    assert mounts["dind"]["state"]["mountPath"] == mounts["sandboxd"]["state"]["mountPath"] == "/var/lib/sandboxd"
    # The daemon sees the client certificates only, never the CA key.
    assert mounts["sandboxd"]["dind-certs"]["subPath"] == "client"
    env = {e["name"]: e.get("value") for e in daemon["env"]}
    assert env["DOCKER_HOST"] == "tcp://localhost:2376" and env["DOCKER_TLS_VERIFY"] == "1"


def test_host_socket_mode_warns_loudly() -> None:
    notes = render("host-socket-values")[f"{CHART.name}/templates/NOTES.txt"]
    assert "WARNING" in notes and "ROOT ON THE NODE" in notes
    spec = one("host-socket-values", "Deployment", "daemon")["spec"]["template"]["spec"]
    assert spec["securityContext"]["supplementalGroups"] == [999]
    assert "WARNING" not in render("default")[f"{CHART.name}/templates/NOTES.txt"]


def test_notes_say_what_the_network_and_shutdown_modes_imply() -> None:
    notes = {name: render(name)[f"{CHART.name}/templates/NOTES.txt"] for name in VALUE_SETS}
    assert "a remote engine cannot mount" in notes["external-values"]
    assert "networkMode=host: tools in sandboxes have raw networking" in notes["external-host-network-values"]
    assert "Hand-off: SIGTERM leaves running sessions" in notes["host-socket-handoff-values"]
    assert "the same node" in notes["host-socket-handoff-values"]
    assert "owned by uid 10002" in notes["host-socket-values"]
    assert "AUDIT MODE" in notes["egress-allowlist-values"]
    for quiet in ("raw networking", "Hand-off", "AUDIT MODE"):
        assert quiet not in notes["default"]


def _checkov() -> str:
    """checkov pins `packaging<24` (pytest wants >=24), so it lives in its own virtualenv."""
    for candidate in (os.environ.get("CHECKOV"), shutil.which("checkov"), str(REPO / ".venv-checkov/bin/checkov"),
                      "/opt/checkov/bin/checkov"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("checkov is missing: python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov "
                "(or set CHECKOV to its path)", pytrace=False)


def _strip_not_ours(doc: dict[str, Any]) -> dict[str, Any]:
    """The same object with only our containers and without the chart's checkov skips."""
    doc = json.loads(json.dumps(doc))
    annotations = doc["metadata"].get("annotations", {})
    for key in [k for k in annotations if k.startswith("checkov.io/")]:
        del annotations[key]
    if doc["kind"] == "Deployment":
        spec = doc["spec"]["template"]["spec"]
        spec["initContainers"] = [c for c in spec.get("initContainers", []) if c["name"] not in NOT_OURS]
        if not spec["initContainers"]:
            del spec["initContainers"]
    return doc


@cache
def checkov_failures(variant: str) -> dict[str, list[str]]:
    """value set -> failed checks, from one checkov run over every value set's manifests.

    `chart`: as rendered, the chart's justified skip annotations honoured. `ours`: only our
    containers and no skip annotations. Both: less CHECKOV_ACCEPTED (and _BY_MODE for `ours`).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"checkov-{variant}-") as tmp:
        root = Path(tmp)
        for name in VALUE_SETS:
            docs = manifests(name) if variant == "chart" else [_strip_not_ours(d) for d in manifests(name)]
            (root / name).mkdir()
            (root / name / "manifests.yaml").write_text(yaml.safe_dump_all(docs))
        result = subprocess.run(
            [_checkov(), "--directory", str(root), "--framework", "kubernetes", "--output", "json",
             "--compact", "--skip-download"],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
        )
    assert result.returncode in (0, 1), f"checkov failed to run: {result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    results = [r.get("results", {}) for r in (report if isinstance(report, list) else [report])]
    assert not any(r.get("parsing_errors") for r in results), f"checkov could not parse: {results}"

    def value_set_of(check: dict[str, Any]) -> str:
        return str(check["file_path"]).strip("/").split("/")[0]

    scanned = {value_set_of(c) for r in results for c in r.get("passed_checks", [])}
    assert scanned == set(VALUE_SETS), f"checkov scanned {scanned}"
    failures: dict[str, list[str]] = {name: [] for name in VALUE_SETS}
    for check in (c for r in results for c in r.get("failed_checks", [])):
        name = value_set_of(check)
        accepted = CHECKOV_ACCEPTED | (CHECKOV_ACCEPTED_BY_MODE.get(docker_mode(name), {}) if variant == "ours" else {})
        if check["check_id"] not in accepted:
            failures[name].append(f"{check['check_id']} {check['resource']}: {check['check_name']}")
    return failures


@value_sets
@pytest.mark.parametrize("variant", ["chart", "ours"])
def test_security_scan_passes(value_set: str, variant: str) -> None:
    assert checkov_failures(variant)[value_set] == []


# --- values: documented, and impossible ones rejected -----------------------------------------------

# Kubernetes objects documented as a whole by their parent's comment.
_FREE_FORM = ("resources.", "docker.dind.resources.", "exporter.resources.", "podSecurityContext.",
              "securityContext.", "updateStrategy.")


def test_every_value_is_documented_by_a_comment_naming_it() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [match.group(2)])
        stack.append((indent, match.group(2)))
        if path.startswith(_FREE_FORM):
            continue
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            above -= 1
        block = [line.strip() for line in lines[above + 1:number]]
        if not block or not block[0].startswith(f"# {path} -- "):
            undocumented.append(path)
    assert not undocumented, f"values without a '# <key> -- ...' comment: {undocumented}"


def _expectation(path: Path) -> tuple[str, str]:
    text = path.read_text()
    by = re.search(r"^# rejected-by: (schema|template)$", text, re.M)
    expect = re.search(r"^# expect: (.+)$", text, re.M)
    assert by and expect, f"{path.name}: needs '# rejected-by:' and '# expect:' lines"
    return by.group(1), expect.group(1)


def test_there_are_bad_values_of_both_kinds() -> None:
    kinds = [_expectation(p)[0] for p in BAD_VALUES]
    assert kinds.count("schema") >= 10 and kinds.count("template") >= 5


@pytest.mark.parametrize("path", BAD_VALUES, ids=[p.stem for p in BAD_VALUES])
def test_bad_values_are_rejected(path: Path) -> None:
    by, expect = _expectation(path)
    values = yaml.safe_load(path.read_text())
    if by == "schema":
        with pytest.raises(helm.HelmValuesError) as caught:
            _chart().validate_schema(values)
        assert expect in str(caught.value)
        # and a lint run (as `helm lint -f` does) reports it too
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        assert any(expect in e for e in report["errors"]) or any(expect in m["error"] for m in report["messages"])
    else:
        _chart().validate_schema(values)  # a valid value, an impossible combination
        with pytest.raises(helm.HelmError) as refused:
            _chart().render(values, name=RELEASE, namespace=NAMESPACE)
        assert expect in str(refused.value)


# `fail`s no values file can reach, each with why.
UNREACHABLE_FAILS = {
    "files/prometheus-rules.yaml is missing": "guards a packaging mistake (the symlink not followed), not a value",
}


def _fail_patterns() -> dict[str, re.Pattern[str]]:
    """Each `fail` message of _helpers.tpl, its printf verbs as wildcards."""
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    messages = re.findall(r'fail (?:\(printf )?"((?:[^"\\]|\\.)*)"', text)
    assert len(messages) >= 15, messages
    return {m: re.compile(".*?".join(re.escape(part) for part in re.split(r"%[-+# 0]*\d*[dqsv]", m)))
            for m in messages}


def test_every_fail_in_the_helpers_is_reached_by_a_bad_values_file() -> None:
    """Each impossible combination has a file in helm/bad-values/ that makes its `fail` fire."""
    errors = []
    for path in BAD_VALUES:
        if _expectation(path)[0] == "template":
            with pytest.raises(helm.HelmError) as caught:
                _chart().render(yaml.safe_load(path.read_text()), name=RELEASE, namespace=NAMESPACE)
            errors.append(str(caught.value))
    unreached = [m for m, pattern in _fail_patterns().items()
                 if not any(pattern.search(e) for e in errors)
                 and not any(m.startswith(prefix) for prefix in UNREACHABLE_FAILS)]
    assert not unreached, f"no helm/bad-values/ file makes these fire: {unreached}"
