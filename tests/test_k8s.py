"""Plain manifests in k8s/: the kustomize base, jobs, components and overlays, built here with the
small subset of kustomize they use (resources, components, configMapGenerator, labels, JSON 6902
patches from files or inline) and, where kubectl is installed, checked against
`kubectl kustomize`."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from crd import (
    K8S_VERSION,
    RAYJOB_CRD,
    needs_crds,
    pod_templates,
    validate_pod_templates,
    validate_spec,
)
from test_doc_drift import check as check_command

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ["overlays/local/pretrain", "overlays/local/sweep", "overlays/gpu-cloud/pretrain",
            "overlays/gpu-cloud/sweep"]
LAYERS = ["jobs/pretrain", "jobs/sweep", *OVERLAYS]
APP_VERSION = yaml.safe_load((REPO / "helm/avsa/Chart.yaml").read_text())["appVersion"]
# The `ray` pin of the package: the chart, k8s/ and the image must run this version.
RAY_VERSION = re.search(r'"ray(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text())[1]


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / remove (what the overlays use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                node[index] = copy.deepcopy(op["value"])
            else:
                del node[index]
        else:
            assert op["op"] == "add" or last in node, f"{op['op']} of a missing {op['path']}"
            if op["op"] == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(op["value"])
    return doc


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group,
              "version": version}
    return all(wanted[k] == v for k, v in target.items())


def build(layer: Path, docs: list[dict] | None = None) -> list[dict]:
    """The objects `kustomize build layer` emits, for the features k8s/ uses; a Component
    (`docs` given) edits the objects of the kustomization that includes it."""
    kustomization = yaml.safe_load((layer / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "resources", "components", "configMapGenerator",
               "generatorOptions", "labels", "patches"}
    assert set(kustomization) <= allowed, set(kustomization) - allowed
    assert (kustomization["kind"] == "Component") == (docs is not None)
    docs = [] if docs is None else docs
    for resource in kustomization.get("resources", []):
        path = layer / resource
        docs += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for component in kustomization.get("components", []):
        docs = build(layer / component, docs)
    for generator in kustomization.get("configMapGenerator", []):
        data = dict(item.split("=", 1) for item in generator.get("literals", []))
        if generator.get("behavior") == "merge":
            existing = next(d for d in docs if d["kind"] == "ConfigMap"
                            and d["metadata"]["name"] == generator["name"])
            existing["data"].update(data)
        else:
            assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
            docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": generator["name"]}, "data": data})
    for label_set in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (layer / patch["path"]).read_text())
        assert isinstance(ops, list), "overlays use JSON 6902 patches only"
        hits = [i for i, d in enumerate(docs) if _matches(d, patch["target"])]
        assert hits, f"patch {patch.get('path', 'inline')} matches nothing"
        for i in hits:
            docs[i] = json_patch(docs[i], ops)
    return docs


def by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=LAYERS)
def layer(request) -> tuple[str, dict[tuple[str, str], dict]]:
    return request.param, by_name(build(K8S / request.param))


def rayjobs(objects: dict) -> dict[str, dict]:
    return {name: d for (kind, name), d in objects.items() if kind == "RayJob"}


def test_each_layer_creates_one_job_with_mlflow_and_the_env(layer):
    name, objects = layer
    job = name.rsplit("/", 1)[-1]
    assert set(rayjobs(objects)) == {f"avsa-{job}"}, "an overlay must create one job, not all"
    assert {("ConfigMap", "avsa-env"), ("Service", "avsa-mlflow"), ("Deployment", "avsa-mlflow"),
            ("ServiceAccount", "avsa-mlflow"), ("PersistentVolumeClaim", "avsa-mlflow")} <= set(objects)
    env = objects[("ConfigMap", "avsa-env")]["data"]
    # The tracking URI names the Service that k8s/ itself brings.
    port = objects[("Service", "avsa-mlflow")]["spec"]["ports"][0]["port"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://avsa-mlflow:{port}"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"]
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "60"  # a stopped job ends its MLflow run
    for obj in objects.values():
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "avsa"


def test_mlflow_manifest_is_rendered_from_the_chart():
    from k8s_mlflow import render

    assert (K8S / "base" / "mlflow.yaml").read_text() == render(), \
        "regenerate: .venv/bin/python tests/k8s_mlflow.py > k8s/base/mlflow.yaml"
    objects = by_name(build(K8S / "jobs/pretrain"))
    pod = objects[("Deployment", "avsa-mlflow")]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "avsa-mlflow"
    assert pod["initContainers"][0]["command"][:3] == ["mlflow", "db", "upgrade"]


def test_rayjobs_have_deadlines_and_token_auth(layer):
    _, objects = layer
    for job in rayjobs(objects).values():
        spec = job["spec"]
        assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
        assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("name", LAYERS)
def test_emulation_agrees_with_kubectl_kustomize(name):
    result = subprocess.run(["kubectl", "kustomize", str(K8S / name)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    real = by_name([d for d in yaml.safe_load_all(result.stdout) if d])
    assert real == by_name(build(K8S / name))


def test_core_objects_and_pod_templates_pass_kubernetes_schemas(layer):
    _, objects = layer
    for obj in objects.values():
        if obj["kind"] == "RayJob":
            validate_pod_templates(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@needs_crds
def test_rayjob_specs_match_kuberay_crd(layer):
    _, objects = layer
    for job in rayjobs(objects).values():
        validate_spec(job, RAYJOB_CRD)


def test_rayjobs_run_the_entry_points_and_shut_down(layer):
    _, objects = layer
    jobs = rayjobs(objects)
    if "avsa-pretrain" in jobs:
        assert jobs["avsa-pretrain"]["spec"]["entrypoint"].startswith("python jobs/pretrain.py experiment=")
    if "avsa-sweep" in jobs:
        assert jobs["avsa-sweep"]["spec"]["entrypoint"].startswith(
            "python jobs/sweep.py sweep=viewpoints_temperature experiment=")
    for job in jobs.values():
        spec = job["spec"]
        assert "storage=s3 storage.path=s3://" in spec["entrypoint"]
        assert "data.shards=s3://" in spec["entrypoint"]
        _, script, *args = shlex.split(spec["entrypoint"])
        check_command(Path(script).stem, args)  # the overrides compose and validate
        assert spec["shutdownAfterJobFinishes"] is True
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"].startswith("s3://")
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == RAY_VERSION
        assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_every_pod_is_non_root_with_requests_limits_and_shared_env(layer):
    _, objects = layer
    for job in rayjobs(objects).values():
        for where, template in pod_templates(job):
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["runAsUser"] == 1000, where
            for container in spec["containers"]:
                # The project's image, the chart's default (its CUDA build on GPU workers).
                assert container["image"] in (f"avsa:{APP_VERSION}", f"avsa:{APP_VERSION}-gpu"), where
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][part]), where
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                if "submitter" not in where:
                    assert container["envFrom"] == [
                        {"configMapRef": {"name": "avsa-env"}},
                        {"secretRef": {"name": "avsa-s3", "optional": True}},
                    ], where
                    volumes = {v["name"]: v for v in spec["volumes"]}
                    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("job", ["pretrain", "sweep"])
def test_local_overlay_is_a_small_cpu_cluster(job):
    objects = by_name(build(K8S / "overlays/local" / job))
    assert objects[("ConfigMap", "avsa-env")]["data"]["AWS_ENDPOINT_URL"].startswith("http://")
    for job in rayjobs(objects).values():
        assert "experiment=demo_local" in job["spec"]["entrypoint"]
        cluster = job["spec"]["rayClusterSpec"]
        assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu"]
        for _, template in pod_templates(job):
            limits = template["spec"]["containers"][0]["resources"]["limits"]
            assert float(limits["cpu"]) <= 2 and "nvidia.com/gpu" not in limits


@pytest.mark.parametrize("job", ["pretrain", "sweep"])
def test_gpu_cloud_overlay_adds_a_tolerating_gpu_group(job):
    base = by_name(build(K8S / "jobs" / job))
    objects = by_name(build(K8S / "overlays/gpu-cloud" / job))
    for name, job in rayjobs(objects).items():
        workers = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
        assert set(workers) == {"cpu", "gpu"}
        assert workers["cpu"] == rayjobs(base)[name]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        pod = workers["gpu"]["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] >= 1
        assert pod["containers"][0]["image"].endswith("-gpu")
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_json_patch_emulation():
    doc = {"a": {"b": [1, 2]}, "c": "x"}
    out = json_patch(doc, [{"op": "add", "path": "/a/b/-", "value": 3},
                           {"op": "replace", "path": "/c", "value": "y"},
                           {"op": "remove", "path": "/a/b/0"}])
    assert out == {"a": {"b": [2, 3]}, "c": "y"} and doc["a"]["b"] == [1, 2]
    with pytest.raises(AssertionError):
        json_patch(doc, [{"op": "replace", "path": "/missing", "value": 1}])


def test_runtime_env_example():
    runtime_env = yaml.safe_load((K8S / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    assert {".git", ".venv", "outputs"} <= set(runtime_env["excludes"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def test_ray_version_matches_the_package_pin():
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pins and set(pins) == {RAY_VERSION}
    chart_values = yaml.safe_load((REPO / "helm/avsa/values.yaml").read_text())
    assert chart_values["ray"]["version"] == RAY_VERSION


def test_no_plaintext_credentials_in_manifests():
    patterns = [re.compile(r"AKIA[0-9A-Z]{16}"), re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
                re.compile(r"(?i)(secret_access_key|password|(?<!automountServiceAccount)token)\s*[:=]\s*\S")]
    for path in sorted(K8S.rglob("*.yaml")):
        text = path.read_text()
        for pattern in patterns:
            assert not pattern.search(text), f"{path}: {pattern.pattern}"


def test_stock_ray_runtime_env_installs_the_package_dependencies():
    """The runtime_env for stock Ray images: working_dir for the code, pip for pyproject's
    dependencies (ray itself comes with the image)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime_env = yaml.safe_load((K8S / "runtime_env.stock-ray.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    assert runtime_env["pip"] == [d for d in deps if not d.startswith("ray")]
    assert {".git", ".venv", "outputs", "mlruns"} <= set(runtime_env["excludes"])
