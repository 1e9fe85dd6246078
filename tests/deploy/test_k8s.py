"""deploy/k8s: the kustomize base and the vLLM example render, validate against Kubernetes' schemas offline,
and agree with inhouse: probe paths, the drain inside the grace period, the Secret the container reads, the
ConfigMap inhouse loads, and the autoscaler's metrics served by the Prometheus adapter's rules.

Rendering is ``kubectl kustomize`` (kubectl is part of this project's machine image); validation is
``kubernetes-validate`` (requirements-test.txt), which carries the schemas of each Kubernetes release, strict:
an unknown field is an error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from inhouse.config import ConfigError, load_settings
from tests.process import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES = ("1.30.0", "1.37.0")  # the oldest release with every field used here, and the newest known
OVERLAYS = {"base": K8S / "base", "vllm-gpu": K8S / "examples" / "vllm-gpu"}
Doc = dict[str, Any]


def kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing (it is part of the project's machine image)"
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return kustomize(OVERLAYS[request.param])


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def container(docs: list[Doc], name: str = "inhouse") -> Doc:
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def inhouse_yaml(docs: list[Doc], tmp_path: Path) -> Path:
    path = tmp_path / "inhouse.yaml"
    path.write_text(one(docs, "ConfigMap", "inhouse-config")["data"]["inhouse.yaml"], encoding="utf-8")
    return path


def test_base_renders_every_part(docs: list[Doc]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "inhouse"), ("Service", "inhouse"), ("HorizontalPodAutoscaler", "inhouse"),
            ("PodDisruptionBudget", "inhouse"), ("Secret", "inhouse-secrets"), ("ConfigMap", "inhouse-config")} <= kinds


@pytest.mark.parametrize("version", KUBERNETES)
def test_every_manifest_is_valid_kubernetes(docs: list[Doc], version: str) -> None:
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_raw_manifest_is_valid_kubernetes_too() -> None:
    """The files as written (for readers who apply them without kustomize)."""
    files = [p for p in K8S.rglob("*.yaml") if p.name not in ("kustomization.yaml", "values.yaml")]
    assert len(files) >= 8
    for path in files:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            kubernetes_validate.validate(doc, KUBERNETES[-1], strict=True)


def test_the_validator_rejects_an_unknown_field(docs: list[Doc]) -> None:
    hpa = yaml.safe_load(yaml.safe_dump(one(docs, "HorizontalPodAutoscaler", "inhouse")))
    hpa["spec"]["minReplica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="minReplica"):
        kubernetes_validate.validate(hpa, KUBERNETES[-1], strict=True)


def test_probes_are_health_for_liveness_and_ready_for_readiness(docs: list[Doc]) -> None:
    c = container(docs)
    port = c["ports"][0]
    assert port == {"name": "http", "containerPort": 8000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}


def test_the_drain_fits_in_the_grace_period(docs: list[Doc], tmp_path: Path) -> None:
    pod = one(docs, "Deployment", "inhouse")["spec"]["template"]["spec"]
    command = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = load_settings(inhouse_yaml(docs, tmp_path)).drain_seconds
    assert int(command[1]) + drain < pod["terminationGracePeriodSeconds"]


def test_the_container_runs_inhouse_as_its_non_root_user(docs: list[Doc]) -> None:
    pod = one(docs, "Deployment", "inhouse")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert "USER 10001:10001" in (REPO / "deploy" / "docker" / "Dockerfile").read_text(encoding="utf-8")
    c = container(docs)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["args"][:3] == ["serve", "--config", "/etc/inhouse/inhouse.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["config"] == "/etc/inhouse"


def test_secrets_reach_inhouse_through_the_names_it_reads(docs: list[Doc]) -> None:
    c = container(docs)
    secret = one(docs, "Secret", "inhouse-secrets")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    for ref in env.values():
        assert ref["name"] == "inhouse-secrets" and ref["key"] in secret["stringData"]
    assert "INHOUSE_ADMIN_KEY" in env  # Settings.admin_key_env's default
    args = c["args"]
    for flag in ("--database-url", "--redis-url"):
        variable = args[args.index(flag) + 1]
        assert variable.startswith("$(") and variable[2:-1] in env  # Kubernetes expands $(VAR) in args


def test_the_placeholder_admin_key_stops_inhouse_at_start(docs: list[Doc], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    placeholder = one(docs, "Secret", "inhouse-secrets")["stringData"]["admin-key"]
    monkeypatch.setenv("INHOUSE_ADMIN_KEY", placeholder)
    with pytest.raises(ConfigError, match="at least 20 characters"):
        load_settings(inhouse_yaml(docs, tmp_path))


def test_the_configmap_is_a_valid_inhouse_yaml(docs: list[Doc], tmp_path: Path) -> None:
    settings = load_settings(inhouse_yaml(docs, tmp_path))
    assert settings.host == "0.0.0.0" and settings.port == 8000 and settings.log_format == "json"
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= {m.name for m in settings.models}


def test_the_vllm_example_puts_inhouse_in_front_of_vllm(tmp_path: Path) -> None:
    docs = kustomize(OVERLAYS["vllm-gpu"])
    vllm = container(docs, "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    served = vllm["args"][vllm["args"].index("--served-model-name") + 1]
    port = int(vllm["args"][vllm["args"].index("--port") + 1])
    service = one(docs, "Service", "vllm")
    assert service["spec"]["ports"][0]["port"] == port
    settings = load_settings(inhouse_yaml(docs, tmp_path))
    upstream = next(m for m in settings.models if m.engine == "upstream")
    assert upstream.base_url == f"http://vllm:{port}/v1"  # type: ignore[union-attr]
    assert upstream.upstream_model == served  # type: ignore[union-attr]
    assert upstream.fallbacks == ("smollm2-135m-instruct",)
    assert container(docs)["image"] == one(kustomize(OVERLAYS["base"]), "Deployment", "inhouse")[
        "spec"]["template"]["spec"]["containers"][0]["image"]


def adapter_rules() -> list[Doc]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text(encoding="utf-8"))
    assert values["rules"]["default"] is False
    return values["rules"]["custom"]  # type: ignore[no-any-return]


def test_the_autoscaler_reads_metrics_the_adapter_serves(docs: list[Doc]) -> None:
    hpa = one(docs, "HorizontalPodAutoscaler", "inhouse")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "inhouse"}
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB, a drain never takes the last replica
    served = {rule["name"]["as"] for rule in adapter_rules()}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == {"inhouse_engine_waiting_sequences", "inhouse_engine_running_sequences"}
    assert wanted <= served


def test_the_adapter_rules_map_series_to_pods() -> None:
    for rule in adapter_rules():
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert rule["seriesQuery"].startswith(rule["name"]["as"] + "{")
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_pod_disruption_budget_and_service_select_the_pods(docs: list[Doc]) -> None:
    labels = one(docs, "Deployment", "inhouse")["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", "inhouse")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1
    service = one(docs, "Service", "inhouse")["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == "http"


def test_the_pod_scrape_config_labels_series_with_namespace_and_pod() -> None:
    """Structure only: Debian's promtool is built without Kubernetes service discovery, so it cannot parse this
    file (``field kubernetes_sd_configs not found``)."""
    config = yaml.safe_load((K8S / "prometheus-adapter" / "prometheus-scrape.yml").read_text(encoding="utf-8"))
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = job["relabel_configs"]
    assert {r.get("target_label") for r in relabel} >= {"namespace", "pod", "__address__", "__metrics_path__"}
    keep = next(r for r in relabel if r.get("action") == "keep")
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    annotations = kustomize(OVERLAYS["base"])
    pod = one(annotations, "Deployment", "inhouse")["spec"]["template"]["metadata"]["annotations"]
    assert pod["prometheus.io/scrape"] == keep["regex"] == "true"
    assert pod["prometheus.io/port"] == "8000" and pod["prometheus.io/path"] == "/metrics"
    for rule in relabel:
        re.compile(rule.get("regex", ".*"))


def test_every_yaml_file_under_deploy_parses_to_mappings() -> None:
    paths = sorted((REPO / "deploy").rglob("*.y*ml"))
    assert len(paths) >= 15
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict), path
