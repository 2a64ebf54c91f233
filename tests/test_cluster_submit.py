"""avsa.cluster: the RayJob `avsa submit` prints for `kubectl create -f -`, k8s/'s RayJob patched
by flags. No Kubernetes API server here: the objects are checked against the KubeRay and
Kubernetes schemas, and against what `kubectl apply -k` would create."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys

import pytest
import yaml
from crd import (
    RAYJOB_CRD,
    crd_spec_schema,
    needs_crds,
    pod_templates,
    validate_pod_templates,
    validate_spec,
)
from test_k8s import APP_VERSION, K8S, RAY_VERSION, build

from avsa.cluster import build_rayjob, main, to_yaml
from avsa.errors import ConfigError

pytestmark = pytest.mark.cluster

# The image the Dockerfile builds, as the chart and k8s/ name it.
DEFAULT_IMAGE = f"avsa:{APP_VERSION}"

ARGV = ["python", "jobs/pretrain.py", "experiment=avsa_yt360", "storage=s3",
        "storage.path=s3://bucket/runs", "data.shards=s3://bucket/shards/train/manifest.json"]


def job(**overrides):
    argv = overrides.pop("argv", ARGV)
    params = dict(image=DEFAULT_IMAGE, num_gpu_workers=2, gpus_per_worker=4, cpu_workers=3,
                  namespace="ml", s3_secret="avsa-s3", mlflow_uri="http://avsa-mlflow.ml.svc:5000",
                  working_dir="s3://bucket/code/avsa.zip")
    params.update(overrides)
    return build_rayjob("avsa-pretrain", argv, **params)


def workers(obj: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in obj["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])}


@needs_crds
@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_gpu_workers": 0, "cpu_workers": 0, "s3_secret": None, "mlflow_uri": None,
          "working_dir": None},
     {"service_account": "avsa", "gpu_image": f"{DEFAULT_IMAGE}-gpu", "env": {"AWS_REGION": "eu-west-1"}}],
    ids=["gpu+cpu", "head-only", "options"],
)
def test_built_rayjob_passes_the_crd_and_pod_schemas(overrides):
    obj = job(**overrides)
    validate_spec(obj, RAYJOB_CRD)
    validate_pod_templates(obj)
    for where, template in pod_templates(obj):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for container in spec["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where


def test_worker_groups_follow_the_counts():
    obj = job()
    groups = workers(obj)
    assert groups["gpu"]["replicas"] == groups["gpu"]["minReplicas"] == groups["gpu"]["maxReplicas"] == 2
    res = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 4
    assert groups["cpu"]["replicas"] == 3
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert obj["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert obj["spec"]["rayClusterSpec"]["rayVersion"] == RAY_VERSION
    assert set(workers(job(num_gpu_workers=0))) == {"cpu"}
    assert set(workers(job(cpu_workers=0))) == {"gpu"}
    alone = job(num_gpu_workers=0, cpu_workers=0)
    assert workers(alone) == {}
    # Without workers the head must run the tasks itself.
    assert "num-cpus" not in alone["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]


def test_entrypoint_env_secret_and_runtime_env():
    argv = ["jobs/pretrain.py", "experiment=avsa_yt360", "train.note=two words", "x='quoted'"]
    obj = job(argv=argv)
    spec = obj["spec"]
    assert shlex.split(spec["entrypoint"]) == ["python", *argv]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "s3://bucket/code/avsa.zip"
    templates = dict(pod_templates(obj))
    submitter = templates.pop("spec.submitterPodTemplate")
    assert submitter["spec"]["containers"][0]["name"] == "ray-job-submitter"
    for template in templates.values():
        container = template["spec"]["containers"][0]
        assert container["env"] == [{"name": "MLFLOW_TRACKING_URI",
                                     "value": "http://avsa-mlflow.ml.svc:5000"}]
        assert container["envFrom"] == [{"secretRef": {"name": "avsa-s3"}}]
        assert container["image"] in (DEFAULT_IMAGE, f"{DEFAULT_IMAGE}-gpu")
    assert obj["metadata"] == {"name": "avsa-pretrain", "namespace": "ml",
                               "labels": {"app.kubernetes.io/name": "avsa",
                                          "app.kubernetes.io/part-of": "avsa"}}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"name": "Pretrain"}, "name"),
        ({"name": "a" * 48}, "name"),
        ({"name": "1job"}, "name"),
        ({"namespace": "ML"}, "namespace"),
        ({"argv": []}, "entrypoint_args"),
        ({"argv": "jobs/pretrain.py"}, "entrypoint_args"),
        ({"num_gpu_workers": -1}, "num_gpu_workers"),
        ({"cpu_workers": 1.5}, "cpu_workers"),
        ({"gpus_per_worker": 0}, "gpus_per_worker"),
        ({"image": ""}, "image"),
        ({"s3_secret": "AKIAFAKEFAKEFAKEFAKE"}, "s3_secret"),
        ({"mlflow_uri": "https://user:hunter2@mlflow.example"}, "mlflow_uri"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "env.AWS_SECRET_ACCESS_KEY"),
        ({"env": {"MLFLOW_TRACKING_TOKEN": "x"}}, "env.MLFLOW_TRACKING_TOKEN"),
        ({"env": {"BAD NAME": "x"}}, "env.BAD NAME"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_key(overrides, key):
    name = overrides.pop("name", "avsa-pretrain")
    argv = overrides.pop("argv", ARGV)
    params = dict(image=DEFAULT_IMAGE, num_gpu_workers=1, gpus_per_worker=1, cpu_workers=1,
                  namespace="ml")
    params.update(overrides)
    with pytest.raises(ConfigError) as info:
        build_rayjob(name, argv, **params)
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_to_yaml_round_trips_and_keeps_the_runtime_env_readable():
    obj = job()
    text = to_yaml(obj)
    assert yaml.safe_load(text) == obj
    assert "runtimeEnvYAML: |" in text


def test_dry_run_prints_the_same_rayjob(capsys):
    code = main(["avsa-pretrain", "-n", "ml", "--gpu-workers", "2", "--gpus-per-worker", "4",
                 "--cpu-workers", "3", "--s3-secret", "avsa-s3",
                 "--mlflow-uri", "http://avsa-mlflow.ml.svc:5000",
                 "--working-dir", "s3://bucket/code/avsa.zip", "--dry-run", "--", *ARGV])
    assert code == 0
    assert yaml.safe_load(capsys.readouterr().out) == job()


def test_dry_run_keeps_options_after_the_separator_in_the_command(capsys):
    main(["avsa-sweep", "--dry-run", "--env", "AWS_REGION=eu-west-1", "--",
          "jobs/sweep.py", "sweep=viewpoints_temperature", "--help"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["spec"]["entrypoint"] == "python jobs/sweep.py sweep=viewpoints_temperature --help"
    env = printed["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "AWS_REGION", "value": "eu-west-1"}]


def test_cli_bad_input_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "avsa.cluster", "Bad_Name", "--dry-run", "--",
                             "jobs/pretrain.py"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: name: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("flags, named", [
    (["--gpu-workers", "-1"], "--gpu-workers: "),
    (["--gpu-workers", "1", "--gpus-per-worker", "0"], "--gpus-per-worker: "),
    (["--active-deadline", "-5"], "--active-deadline: "),
    (["-n", "Bad_NS"], "--namespace: "),
    (["--env", "AWS_SECRET_ACCESS_KEY=x"], "--env AWS_SECRET_ACCESS_KEY: looks like a "
                                            "credential; put it in the Secret that --s3-secret"),
])
def test_cli_errors_name_the_flag_typed(flags, named):
    with pytest.raises(ConfigError) as e:
        main(["ok", *flags, "--dry-run", "--", "jobs/pretrain.py"])
    assert str(e.value).startswith(named)


@needs_crds
def test_crd_validation_names_the_bad_field():
    obj = job()
    typo = copy.deepcopy(obj)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(ConfigError, match=r"workerGroupSpecs\.0: .*'replica'"):
        validate_spec(typo, RAYJOB_CRD)
    wrong_type = copy.deepcopy(obj)
    wrong_type["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(ConfigError, match=r"rayStartParams\.num-cpus: 0 is not of type 'string'"):
        validate_spec(wrong_type, RAYJOB_CRD)
    with pytest.raises(ConfigError, match="v9"):
        crd_spec_schema(RAYJOB_CRD, "v9")


def test_without_a_uri_the_pods_read_the_release_config_map():
    obj = job(mlflow_uri=None)
    for where, template in pod_templates(obj):
        container = template["spec"]["containers"][0]
        if "submitter" in where:
            continue
        assert "env" not in container
        assert container["envFrom"] == [{"configMapRef": {"name": "avsa-env"}},
                                        {"secretRef": {"name": "avsa-s3"}}]
    other = job(mlflow_uri=None, release="ml-team")
    head = other["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["envFrom"][0] == {"configMapRef": {"name": "ml-team-env"}}
    with pytest.raises(ConfigError, match=r"^release: "):
        job(release="Not A Release")


def test_token_auth_deadlines_and_the_projects_images():
    spec = job()["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["preRunningDeadlineSeconds"] == 1800
    assert spec["activeDeadlineSeconds"] > spec["preRunningDeadlineSeconds"]
    assert DEFAULT_IMAGE.startswith("avsa:")
    images = {w: t["spec"]["containers"][0]["image"] for w, t in pod_templates(job())}
    assert images["spec.rayClusterSpec.workerGroupSpecs[gpu].template"] == f"{DEFAULT_IMAGE}-gpu"
    assert images["spec.rayClusterSpec.workerGroupSpecs[cpu].template"] == DEFAULT_IMAGE
    mine = {w: t["spec"]["containers"][0]["image"] for w, t in pod_templates(job(image="r/x:1"))}
    gpu = mine.pop("spec.rayClusterSpec.workerGroupSpecs[gpu].template")
    assert gpu == "r/x:1-gpu" and set(mine.values()) == {"r/x:1"}  # docs/cluster.md's tags
    short = job(pre_running_deadline_s=60)["spec"]
    assert short["preRunningDeadlineSeconds"] == 60
    assert job(image=None) == job()  # no --image: k8s/'s images


def _runtime_env(obj: dict) -> dict:
    return yaml.safe_load(obj["spec"]["runtimeEnvYAML"])


@pytest.mark.parametrize("job_name", ["pretrain", "sweep"])
def test_submit_prints_the_k8s_rayjob_patched_only_where_flags_say(job_name):
    """No copy of the cluster in Python: given the flags that say what k8s/ says, `avsa submit`
    prints the RayJob `kubectl apply -k k8s/overlays/gpu-cloud/<job>` creates, but for what a
    flag owns: the namespace, the component label, and a named Secret being required."""
    (applied,) = [d for d in build(K8S / "overlays/gpu-cloud" / job_name) if d["kind"] == "RayJob"]
    groups = {g["groupName"]: g for g in applied["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpus = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    printed = build_rayjob(applied["metadata"]["name"], shlex.split(applied["spec"]["entrypoint"]),
                           namespace="avsa", num_gpu_workers=groups["gpu"]["replicas"],
                           gpus_per_worker=gpus, cpu_workers=groups["cpu"]["replicas"],
                           s3_secret="avsa-s3", working_dir=_runtime_env(applied)["working_dir"])
    expected = copy.deepcopy(applied)
    expected["metadata"]["namespace"] = "avsa"
    del expected["metadata"]["labels"]["app.kubernetes.io/component"]
    for _, template in pod_templates(expected):
        for ref in template["spec"]["containers"][0].get("envFrom", []):
            ref.get("secretRef", {}).pop("optional", None)
    assert _runtime_env(printed) == _runtime_env(expected)  # the same, quoted differently
    printed["spec"]["runtimeEnvYAML"] = expected["spec"]["runtimeEnvYAML"]
    assert printed == expected
