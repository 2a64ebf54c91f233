"""The Helm chart, rendered offline with helm-python-sdk (Helm's Go library, no helm binary):
lint, Kubernetes schemas of every object, the KubeRay CRD for the RayCluster, security, secrets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd import (
    K8S_VERSION,
    RAYCLUSTER_CRD,
    needs_crds,
    pod_templates,
    validate_pod_templates,
    validate_spec,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "avsa"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
RELEASE, NAMESPACE = "avsa", "ml"

CASES = ["default", "local", "gpu-autoscaling", "external-db"]
# Strings shaped like credentials: none may ever reach a rendered manifest.
FAKE_ACCESS_KEY = "AKIAFAKEFAKEFAKEFAKE"
FAKE_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEFAKEKEY"
FAKE_DB_URI = "postgresql://mlflow:hunter2@db.example:5432/mlflow"
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"[A-Za-z0-9/+]{40}"),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # user:password@ inside a URI
    re.compile(r"hunter2"),
]


def case_values(case: str) -> dict | None:
    if case == "default":
        return None
    return helm.values_from_yaml((CHART / "ci" / f"{case}-values.yaml").read_text())


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict | None = None, name: str = RELEASE) -> tuple[list[dict], str, str]:
    """(objects, NOTES.txt, all manifest text) of the chart with `values`."""
    rendered = chart.render(values, name=name, namespace=NAMESPACE, is_install=True)
    manifests = "\n---\n".join(t for p, t in sorted(rendered.items()) if p.endswith(".yaml"))
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    notes = next((t for p, t in rendered.items() if p.endswith("NOTES.txt")), "")
    return docs, notes, manifests


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def groups(raycluster: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in raycluster["spec"].get("workerGroupSpecs", [])}


def all_pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for doc in docs:
        if doc["kind"] == "RayCluster":
            specs += [(w, t["spec"]) for w, t in pod_templates(doc)]
        elif doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
    return specs


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case):
    report = helm.lint(CHART, case_values(case), strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_core_objects_and_pod_templates_pass_kubernetes_schemas(chart, case):
    docs, _, _ = render(chart, case_values(case))
    assert {d["kind"] for d in docs} >= {"RayCluster", "ServiceAccount", "Service", "Deployment"}
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            validate_pod_templates(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@needs_crds
@pytest.mark.parametrize("case", CASES)
def test_raycluster_spec_matches_kuberay_crd(chart, case):
    docs, _, _ = render(chart, case_values(case))
    validate_spec(only(docs, "RayCluster"), RAYCLUSTER_CRD)


def test_default_cluster_layout(chart):
    docs, _, _ = render(chart)
    rc = only(docs, "RayCluster")
    spec = rc["spec"]
    assert rc["metadata"]["name"] == "avsa"
    assert spec["rayVersion"] == "2.60.0"
    assert "enableInTreeAutoscaling" not in spec
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
    assert head["rayStartParams"]["dashboard-port"] == "8265"
    assert spec["authOptions"] == {"mode": "token"}
    g = groups(rc)
    assert set(g) == {"cpu", "gpu"}
    assert (g["cpu"]["replicas"], g["cpu"]["minReplicas"], g["cpu"]["maxReplicas"]) == (2, 1, 8)
    cpu_res = g["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu_res["requests"] and "nvidia.com/gpu" not in cpu_res["limits"]
    gpu_ctr = g["gpu"]["template"]["spec"]["containers"][0]
    assert gpu_ctr["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu_ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The project's image (the root Dockerfile), CUDA build on GPU workers.
    assert gpu_ctr["image"] == f"avsa:{APP_VERSION}-gpu"
    assert head["template"]["spec"]["containers"][0]["image"] == f"avsa:{APP_VERSION}"


def test_ray_version_is_set_in_one_place(chart):
    def leaves(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from leaves(v)
        elif isinstance(node, list):
            for v in node:
                yield from leaves(v)
        else:
            yield node

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert [v for v in leaves(defaults) if "2.60" in str(v)] == ["2.60.0"]
    docs, _, _ = render(chart, {"ray": {"version": "2.61.1"}})
    assert only(docs, "RayCluster")["spec"]["rayVersion"] == "2.61.1"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=2\.60\.0$", dockerfile, re.M), "image and chart disagree"


def test_gpu_autoscaling_values(chart):
    docs, _, _ = render(chart, case_values("gpu-autoscaling"))
    rc = only(docs, "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    options = rc["spec"]["autoscalerOptions"]
    assert options["upscalingMode"] == "Conservative" and options["idleTimeoutSeconds"] == 600
    assert options["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"}
    gpu = groups(rc)["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8)
    pod = gpu["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 2
    assert res["requests"]["memory"] == res["limits"]["memory"] == "96Gi"
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6.12xlarge"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "tolerations" not in groups(rc)["cpu"]["template"]["spec"]


@pytest.mark.parametrize("case", CASES)
def test_pods_run_as_non_root_with_requests_and_limits(chart, case):
    docs, _, _ = render(chart, case_values(case))
    specs = all_pod_specs(docs)
    assert len(specs) >= 3
    for where, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == 1000, where
        for container in spec["containers"] + spec.get("initContainers", []):
            res = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[part]), f"{where}/{container['name']} {part}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    rc = only(docs, "RayCluster")
    if rc["spec"].get("enableInTreeAutoscaling"):
        assert {"requests", "limits"} <= set(rc["spec"]["autoscalerOptions"]["resources"])


@pytest.mark.parametrize("case", CASES)
def test_ray_nodes_share_one_environment_and_shm(chart, case):
    docs, _, _ = render(chart, case_values(case))
    rc = only(docs, "RayCluster")
    templates = [t for _, t in pod_templates(rc)]
    envs = [t["spec"]["containers"][0].get("env") for t in templates]
    env_froms = [t["spec"]["containers"][0].get("envFrom") for t in templates]
    assert all(e == envs[0] for e in envs) and all(e == env_froms[0] for e in env_froms)
    config_map = only(docs, "ConfigMap")
    assert env_froms[0][0] == {"configMapRef": {"name": config_map["metadata"]["name"]}}
    env = config_map["data"]
    service = only(docs, "Service")
    expected_uri = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    assert env["MLFLOW_TRACKING_URI"] == expected_uri
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"]
    assert ("AWS_ENDPOINT_URL" in env) == (case == "external-db")
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "60"  # a stopped job ends its MLflow run
    for t in templates:
        volumes = {v["name"]: v for v in t["spec"]["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["shm"]["emptyDir"]["sizeLimit"]
        mounts = t["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "shm", "mountPath": "/dev/shm"} in mounts


def test_mlflow_defaults_to_sqlite_on_a_claim(chart):
    docs, _, _ = render(chart)
    deployment = only(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in args
    assert "--serve-artifacts" in args
    assert "--artifacts-destination=/mlflow/artifacts" in args
    claim = only(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    service = only(docs, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    hosts = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert f"avsa-mlflow.{NAMESPACE}.svc*" in hosts.split(",")


def test_mlflow_external_database_from_a_secret(chart):
    docs, _, text = render(chart, case_values("external-db"))
    container = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--backend-store-uri") for a in container["args"])
    assert "--artifacts-destination=s3://avsa-mlflow/artifacts" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "avsa-mlflow-db", "key": "uri"}
    assert container["envFrom"] == [{"secretRef": {"name": "avsa-s3"}}]
    # External database and S3 artifacts: nothing left for a volume to hold.
    assert [d for d in docs if d["kind"] == "PersistentVolumeClaim"] == []
    assert "sqlite" not in text


def test_networkpolicy_only_when_enabled(chart):
    docs, _, _ = render(chart)
    assert [d for d in docs if d["kind"] == "NetworkPolicy"] == []
    docs, _, _ = render(chart, case_values("gpu-autoscaling"))
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"avsa-ray", "avsa-mlflow"}

    def ports(policy):
        return {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}

    # Every head port, metrics included, so a Prometheus in extraFrom can scrape 8080.
    assert ports(policies["avsa-ray"]) == {6379, 8265, 10001, 8080}
    assert ports(policies["avsa-mlflow"]) == {5000}
    ray_selector = policies["avsa-ray"]["spec"]["podSelector"]["matchLabels"].items()
    for _, template in pod_templates(only(docs, "RayCluster")):
        assert ray_selector <= template["metadata"]["labels"].items()
    mlflow_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    assert policies["avsa-mlflow"]["spec"]["podSelector"]["matchLabels"].items() <= mlflow_labels
    assert not ray_selector <= mlflow_labels
    # Ingress comes from pods only, never from an ipBlock (outside the cluster).
    peers = [p for pol in policies.values() for r in pol["spec"]["ingress"] for p in r["from"]]
    assert peers and all("ipBlock" not in p for p in peers)


def test_notes_explain_port_forward_and_first_job(chart):
    _, notes, _ = render(chart)
    assert f"kubectl port-forward --namespace {NAMESPACE} svc/avsa-head-svc 8265:8265" in notes
    assert f"kubectl port-forward --namespace {NAMESPACE} svc/avsa-mlflow 5000:5000" in notes
    assert "ray job submit --address http://localhost:8265 --working-dir ." in notes
    assert "export RAY_AUTH_MODE=token" in notes
    assert "kubectl get secret --namespace ml avsa -o jsonpath='{.data.auth_token}'" in notes
    assert "python jobs/pretrain.py experiment=avsa_yt360 storage=s3" in notes
    assert "kuberay-operator" in notes
    _, notes, _ = render(chart, {"mlflow": {"enabled": False, "externalTrackingUri": "http://m:5000"},
                                 "s3": {"existingSecret": "avsa-s3"}})
    assert "svc/avsa-mlflow" not in notes and "no S3" not in notes


def test_names_are_truncated_to_kubernetes_limits(chart):
    docs, _, _ = render(chart, name="r" * 53)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    assert len(only(docs, "RayCluster")["metadata"]["name"]) <= 53  # KubeRay's own limit


def test_rendered_output_never_holds_a_plaintext_secret(chart):
    values = case_values("external-db")
    values["imagePullSecrets"] = [{"name": "regcred"}]
    values["serviceAccount"] = {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}}
    values["extraEnv"].append({"name": "AWS_SESSION_TOKEN",
                               "valueFrom": {"secretKeyRef": {"name": "avsa-s3", "key": "token"}}})
    docs, notes, text = render(chart, values)
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text + notes), pattern.pattern
    # Every credential-like variable is a reference, never a literal.
    for _, spec in all_pod_specs(docs):
        for e in spec["containers"][0].get("env", []):
            if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|BACKEND_STORE", e["name"]):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], e["name"]


@pytest.mark.parametrize(
    "values",
    [
        {"s3": {"existingSecret": FAKE_ACCESS_KEY}},
        {"s3": {"existingSecret": FAKE_SECRET_KEY}},
        {"mlflow": {"backendStore": {"existingSecret": FAKE_DB_URI}}},
        {"imagePullSecrets": [{"name": FAKE_SECRET_KEY}]},
    ],
    ids=["s3-access-key", "s3-secret-key", "db-uri", "pull-secret"],
)
def test_secret_name_fields_refuse_secret_values(chart, values):
    with pytest.raises(helm.HelmValuesError, match="does not match pattern"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    "values",
    [
        {"s3": {"accessKeyId": FAKE_ACCESS_KEY}},
        {"s3": {"secretAccessKey": FAKE_SECRET_KEY}},
        {"mlflow": {"backendStore": {"uri": FAKE_DB_URI}}},
        {"mlflow": {"externalTrackingUri": "https://user:hunter2@mlflow.example"}},
        {"mlflow": {"extraArgs": [f"--backend-store-uri={FAKE_DB_URI}"]}},
        {"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": FAKE_SECRET_KEY}]},
        {"extraEnv": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}]},
    ],
    ids=["accessKeyId", "secretAccessKey", "db-uri", "uri-password", "arg-password",
         "env-secret", "env-password"],
)
def test_schema_rejects_plaintext_credentials(chart, values):
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART, values)
    assert report["errors"], values


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gpuWorkers": {"gpusPerWorker": "two"}}, "/gpuWorkers/gpusPerWorker"),
        ({"gpuWorkers": {"gpusPerWorker": 0}}, "/gpuWorkers/gpusPerWorker"),
        ({"autoscaling": {"upscalingMode": "Fast"}}, "/autoscaling/upscalingMode"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"head": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": None}}},
         "/head/resources"),
        ({"cpuWorkers": {"replicas": -1}}, "/cpuWorkers/replicas"),
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
    ],
)
def test_schema_checks_types_and_enums(chart, values, where):
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_replica_bounds_are_checked(chart):
    with pytest.raises(helm.HelmRenderError, match=r"cpuWorkers.replicas \(9\)"):
        chart.render({"cpuWorkers": {"replicas": 9}}, name=RELEASE, namespace=NAMESPACE)


def test_values_schema_is_valid_and_accepts_the_defaults():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)


def test_every_value_is_documented():
    """Each key of values.yaml, or a key above it, carries a `# --` comment (helm-docs)."""
    undocumented, stack, comment = [], [], []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^( *)([A-Za-z0-9_.-]+):", line)
        if not match:
            comment = [] if not stripped else comment
            continue
        indent = len(match.group(1))
        stack = [(i, doc) for i, doc in stack if i < indent]
        documented = any(c.startswith("# --") for c in comment) or any(doc for _, doc in stack)
        stack.append((indent, documented))
        has_children = line.rstrip().endswith(":")
        if not documented and not has_children:
            undocumented.append(match.group(2))
        comment = []
    assert undocumented == []


def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "avsa"
    assert chart.schema is not None
    readme = (CHART / "README.md").read_text()
    assert "kuberay-operator" in readme


# ----------------------------------------------------------------------------- one test per defect


def test_user_ray_start_params_win_over_the_charts(chart):
    user = {"dashboard-host": "127.0.0.1", "num-cpus": "3", "metrics-export-port": "9090"}
    docs, _, _ = render(chart, {"head": {"rayStartParams": user}})
    params = only(docs, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
    assert {k: params[k] for k in user} == user
    assert params["dashboard-port"] == "8265"  # the chart's own, where the user said nothing


@pytest.mark.parametrize(
    ("image", "head", "gpu"),
    [
        ({}, f"avsa:{APP_VERSION}", f"avsa:{APP_VERSION}-gpu"),
        ({"repository": "reg.example/t/avsa"}, f"reg.example/t/avsa:{APP_VERSION}",
         f"reg.example/t/avsa:{APP_VERSION}-gpu"),
        ({"tag": "0.2.0-cuda"}, "avsa:0.2.0-cuda", "avsa:0.2.0-cuda"),
        ({"tag": "0.2.0", "gpuTag": "0.2.0-gpu"}, "avsa:0.2.0", "avsa:0.2.0-gpu"),
    ],
    ids=["default", "registry", "explicit-tag", "explicit-gpu-tag"],
)
def test_gpu_suffix_only_extends_the_default_tag(chart, image, head, gpu):
    docs, _, _ = render(chart, {"image": image})
    images = {where: t["spec"]["containers"][0]["image"]
              for where, t in pod_templates(only(docs, "RayCluster"))}
    assert images["spec.headGroupSpec.template"] == head
    assert images["spec.workerGroupSpecs[cpu].template"] == head
    assert images["spec.workerGroupSpecs[gpu].template"] == gpu


def test_networkpolicy_ports_follow_the_values(chart):
    values = {"networkPolicy": {"enabled": True},
              "head": {"ports": {"gcs": 6380, "dashboard": 8266, "client": 10002, "metrics": 9090}},
              "mlflow": {"port": 5001}}
    docs, _, _ = render(chart, values)
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    opened = {p["port"] for r in policies["avsa-ray"]["spec"]["ingress"] for p in r.get("ports", [])}
    assert opened == {6380, 8266, 10002, 9090}
    head = only(docs, "RayCluster")["spec"]["headGroupSpec"]
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} == opened
    assert head["rayStartParams"]["metrics-export-port"] == "9090"
    assert head["rayStartParams"]["port"] == "6380"
    ml = {p["port"] for r in policies["avsa-mlflow"]["spec"]["ingress"] for p in r["ports"]}
    assert ml == {5001}


@pytest.mark.parametrize("case", CASES)
def test_mlflow_has_its_own_service_account_without_a_token(chart, case):
    docs, _, _ = render(chart, case_values(case))
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    ray_accounts = {t["spec"]["serviceAccountName"] for _, t in pod_templates(only(docs, "RayCluster"))}
    assert pod["serviceAccountName"] in accounts
    assert pod["serviceAccountName"] not in ray_accounts
    assert pod["automountServiceAccountToken"] is False
    assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("case", ["default", "external-db"])
def test_mlflow_database_is_upgraded_before_the_server_starts(chart, case):
    docs, _, _ = render(chart, case_values(case))
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == pod["containers"][0]["image"]
    assert init["command"][:3] == ["mlflow", "db", "upgrade"]
    if case == "default":
        assert init["command"][3] == "sqlite:////mlflow/mlflow.db"
        assert {"name": "data", "mountPath": "/mlflow"} in init["volumeMounts"]
    else:  # the URI stays in its Secret; Kubernetes expands $(VAR) in the command
        assert init["command"][3] == "$(MLFLOW_BACKEND_STORE_URI)"
        env = {e["name"]: e for e in init["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "avsa-mlflow-db"
    docs, _, _ = render(chart, {"mlflow": {"dbUpgrade": False}})
    assert "initContainers" not in only(docs, "Deployment")["spec"]["template"]["spec"]


def test_the_rendered_db_upgrade_command_runs(chart, tmp_path):
    """The init container's command, run here on an empty SQLite file at the same path shape."""
    docs, _, _ = render(chart)
    command = only(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]["command"]
    db = tmp_path / "mlflow.db"
    argv = [str(Path(sys.executable).parent / command[0]), *command[1:3],
            command[3].replace("/mlflow/mlflow.db", str(db))]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert again.returncode == 0 and db.stat().st_size > 0


def test_tracking_uri_is_required_without_the_in_cluster_mlflow(chart):
    with pytest.raises(helm.HelmRenderError, match=r"mlflow\.externalTrackingUri is required"):
        chart.render({"mlflow": {"enabled": False}}, name=RELEASE, namespace=NAMESPACE)
    docs, _, _ = render(chart, {"mlflow": {"enabled": False,
                                           "externalTrackingUri": "https://mlflow.example"}})
    assert only(docs, "ConfigMap")["data"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example"
    assert [d for d in docs if d["kind"] in ("Deployment", "Service")
            and "mlflow" in d["metadata"]["name"]] == []


def test_ray_token_auth_is_on_by_default_with_the_token_in_a_secret(chart):
    docs, _, _ = render(chart)
    assert only(docs, "RayCluster")["spec"]["authOptions"] == {"mode": "token"}
    docs, notes, _ = render(chart, {"ray": {"auth": {"existingSecret": "avsa-ray-token"}}})
    assert only(docs, "RayCluster")["spec"]["authOptions"] == {"mode": "token",
                                                               "secretName": "avsa-ray-token"}
    assert "secret --namespace ml avsa-ray-token" in notes
    docs, notes, _ = render(chart, {"ray": {"auth": {"mode": "disabled"}}})
    assert only(docs, "RayCluster")["spec"]["authOptions"] == {"mode": "disabled"}
    assert "RAY_AUTH_MODE" not in notes
    with pytest.raises(helm.HelmValuesError):
        chart.render({"ray": {"auth": {"existingSecret": "x" * 20 + "/token=abc"}}},
                     name=RELEASE, namespace=NAMESPACE)


def test_release_config_map_is_what_avsa_submit_references(chart):
    """`avsa submit` without --mlflow-uri points its RayJob at `<release>-env`: the chart must
    make that ConfigMap, with the tracking URI in it."""
    from avsa.cluster import build_rayjob

    docs, _, _ = render(chart)
    config_map = only(docs, "ConfigMap")
    job = build_rayjob("avsa-pretrain", ["jobs/pretrain.py"], namespace=NAMESPACE, release=RELEASE)
    for _, template in pod_templates(job):
        for container in template["spec"]["containers"]:
            if container["name"] != "ray-job-submitter":
                assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in container["envFrom"]
    assert config_map["data"]["MLFLOW_TRACKING_URI"].startswith("http://")


def test_values_default_image_is_the_projects_image():
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert version == APP_VERSION
    assert yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"] == "avsa"
