"""KubeRay RayJob manifests built from flags: what `kubectl apply -k k8s/...` cannot do is size a
one-off job (GPU workers, CPU workers, deadlines) without editing YAML.

`build_rayjob` returns a plain dict (a `ray.io/v1` RayJob); `avsa submit` prints it for
`kubectl create -f -`, and kubectl follows it (`kubectl logs -f job/NAME`):

    avsa submit avsa-pretrain -n avsa --gpu-workers 4 --s3-secret avsa-s3 -- \
        python jobs/pretrain.py experiment=avsa_yt360 storage=s3 storage.path=s3://b/runs \
      | kubectl create -n avsa -f -

Without `--mlflow-uri` the pods read MLFLOW_TRACKING_URI (and the S3 settings) from the Helm
release's ConfigMap `<release>-env`, the same one the chart's RayCluster reads.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO

import yaml

from avsa.errors import ConfigError

RAY_VERSION = "2.60.0"
try:
    AVSA_VERSION = version("avsa")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    AVSA_VERSION = "0.1.0"
# The image the repository's Dockerfile builds (`-gpu`: its CUDA build), as in the chart and k8s/.
DEFAULT_IMAGE = f"avsa:{AVSA_VERSION}"
GPU_SUFFIX = "-gpu"
GROUP, VERSION = "ray.io", "v1"
SUBMITTER_CONTAINER = "ray-job-submitter"
# KubeRay appends 6 characters to a RayJob name to name its RayCluster, which may have 53.
MAX_RAYJOB_NAME = 47
# A job that cannot get its pods (no GPU node, quota) fails after this instead of holding its
# head forever; a running job is stopped after ACTIVE_DEADLINE_S.
PRE_RUNNING_DEADLINE_S = 1800
ACTIVE_DEADLINE_S = 7 * 24 * 3600

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# Environment names that hold credentials; those belong in the Secret named by `s3_secret`.
_SECRET_ENV = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY|_KEY$", re.IGNORECASE
)

POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,  # the `ray` user of the avsa and rayproject/ray images
    "runAsGroup": 100,
    "fsGroup": 100,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


@dataclass(frozen=True)
class PodResources:
    """CPU and memory of one Ray pod (requests = limits) and its memory-backed /dev/shm.

    cpu: Kubernetes CPU quantity ("8", "500m"); memory and shm: byte quantities ("32Gi").
    The shm volume counts against the memory limit: keep it well below `memory`.
    """

    cpu: str
    memory: str
    shm: str

    def resources(self, gpus: int = 0) -> dict[str, dict[str, Any]]:
        """Kubernetes ResourceRequirements with `nvidia.com/gpu: gpus` when gpus > 0."""
        amounts: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory}
        if gpus > 0:
            amounts["nvidia.com/gpu"] = gpus
        return {"requests": dict(amounts), "limits": dict(amounts)}


HEAD = PodResources(cpu="2", memory="8Gi", shm="2Gi")
CPU_WORKER = PodResources(cpu="8", memory="32Gi", shm="8Gi")
GPU_WORKER = PodResources(cpu="8", memory="64Gi", shm="16Gi")
# The submitter pod only runs `ray job submit` and tails the log.
SUBMITTER_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "500m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


def _entrypoint(args: Sequence[str]) -> str:
    """Shell command of the job: `python` is prepended when the first argument is a .py file."""
    _check(not isinstance(args, str) and len(args) > 0 and all(isinstance(a, str) for a in args),
           "entrypoint_args", f"must be a non-empty list of strings, got {args!r}")
    argv = list(args)
    if argv[0].endswith(".py"):
        argv.insert(0, "python")
    return shlex.join(argv)


def _env_from(release: str, s3_secret: str | None, mlflow_uri: str | None) -> list[dict[str, Any]]:
    """The release's ConfigMap (tracking URI, S3 settings) unless the URI is given, then the S3
    Secret. The ConfigMap reference is not optional: a missing one stops the pod with an error
    instead of letting a job run with nowhere to record it."""
    out: list[dict[str, Any]] = []
    if not mlflow_uri:
        out.append({"configMapRef": {"name": f"{release}-env"}})
    if s3_secret:
        out.append({"secretRef": {"name": s3_secret}})
    return out


def _env(mlflow_uri: str | None, env: Mapping[str, str] | None) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    if mlflow_uri:
        _check("@" not in mlflow_uri, "mlflow_uri",
               "must not embed credentials (user:password@); use MLFLOW_TRACKING_TOKEN in a Secret")
        out.append({"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri})
    for key, value in sorted((env or {}).items()):
        _check(bool(_ENV_NAME.match(key)), f"env.{key}", "is not a valid environment variable name")
        _check(not _SECRET_ENV.search(key), f"env.{key}",
               "looks like a credential; put it in the Secret named by s3_secret instead")
        out.append({"name": key, "value": str(value)})
    return out


def _container(name: str, image: str, res: PodResources, gpus: int, env: list[dict[str, str]],
               env_from: list[dict[str, Any]], head: bool) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent"}
    if head:
        container["ports"] = [
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
        ]
    if env:
        container["env"] = copy.deepcopy(env)
    if env_from:
        container["envFrom"] = copy.deepcopy(env_from)
    container["resources"] = res.resources(gpus)
    container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
    container["volumeMounts"] = [{"name": "shm", "mountPath": "/dev/shm"}]
    return container


def _pod_template(component: str, container: dict[str, Any], res: PodResources,
                  service_account: str | None, tolerations: list[dict[str, str]] | None = None,
                  node_selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if service_account:
        spec["serviceAccountName"] = service_account
    spec["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = copy.deepcopy(tolerations)
    spec["containers"] = [container]
    spec["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm}}]
    labels = {"app.kubernetes.io/name": "avsa", "app.kubernetes.io/component": component}
    return {"metadata": {"labels": labels}, "spec": spec}


def _worker_group(name: str, replicas: int, template: dict[str, Any]) -> dict[str, Any]:
    return {"groupName": name, "replicas": replicas, "minReplicas": replicas,
            "maxReplicas": replicas, "rayStartParams": {}, "template": template}


def build_rayjob(
    name: str,
    entrypoint_args: Sequence[str],
    *,
    namespace: str,
    image: str = DEFAULT_IMAGE,
    num_gpu_workers: int = 0,
    gpus_per_worker: int = 1,
    cpu_workers: int = 1,
    release: str = "avsa",
    s3_secret: str | None = None,
    mlflow_uri: str | None = None,
    working_dir: str | None = None,
    gpu_image: str | None = None,
    env: Mapping[str, str] | None = None,
    service_account: str | None = None,
    gpu_node_selector: Mapping[str, str] | None = None,
    head: PodResources = HEAD,
    cpu_worker: PodResources = CPU_WORKER,
    gpu_worker: PodResources = GPU_WORKER,
    backoff_limit: int = 0,
    ttl_seconds_after_finished: int = 600,
    pre_running_deadline_s: int = PRE_RUNNING_DEADLINE_S,
    active_deadline_s: int = ACTIVE_DEADLINE_S,
) -> dict[str, Any]:
    """A `ray.io/v1` RayJob that starts its own cluster, runs one command and shuts down.

    entrypoint_args: the job's argv, e.g. ["python", "jobs/pretrain.py", "experiment=avsa_yt360"]
        (a leading "*.py" gets "python" prepended); arguments are shell-quoted.
    num_gpu_workers x gpus_per_worker GPUs go to the `gpu` group (omitted when 0); `cpu_workers`
    pods form the `cpu` group for decoding (omitted when 0). With no worker at all the head
    advertises its CPUs, otherwise it keeps `num-cpus: 0` and only hosts the driver.
    s3_secret: name of a Secret whose keys become environment variables (envFrom).
    mlflow_uri: MLFLOW_TRACKING_URI of every Ray container; without it they read the Helm
    release's ConfigMap `<release>-env`. env: more plain variables (names that look like
    credentials are refused). gpu_image defaults to `image` + "-gpu" for the default image.
    The cluster runs with Ray token auth (KubeRay makes the token Secret); the job must reach
    Running within pre_running_deadline_s and end within active_deadline_s. working_dir: runtime-env working_dir, a URI Ray can
    fetch (s3://bucket/avsa.zip) or a path inside the image.
    Raises ConfigError naming the first bad argument.
    """
    _check(isinstance(name, str) and bool(_DNS1035.match(name)) and len(name) <= MAX_RAYJOB_NAME,
           "name", f"must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters, got {name!r}")
    _check(isinstance(namespace, str) and bool(_DNS1123_LABEL.match(namespace))
           and len(namespace) <= 63, "namespace", f"must be a DNS-1123 label, got {namespace!r}")
    _check(bool(image), "image", "must not be empty")
    _check(isinstance(release, str) and bool(_DNS1123_LABEL.match(release)), "release",
           f"must be the name of a Helm release (DNS-1123 label), got {release!r}")
    for key, value in (("num_gpu_workers", num_gpu_workers), ("cpu_workers", cpu_workers),
                       ("backoff_limit", backoff_limit),
                       ("ttl_seconds_after_finished", ttl_seconds_after_finished),
                       ("pre_running_deadline_s", pre_running_deadline_s),
                       ("active_deadline_s", active_deadline_s)):
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key,
               f"must be an integer >= 0, got {value!r}")
    _check(isinstance(gpus_per_worker, int) and gpus_per_worker >= (1 if num_gpu_workers else 0),
           "gpus_per_worker", f"must be an integer >= 1 with GPU workers, got {gpus_per_worker!r}")
    if s3_secret is not None:
        _check(bool(_DNS1123_SUBDOMAIN.match(s3_secret)) and len(s3_secret) <= 253, "s3_secret",
               "must be the name of a Kubernetes Secret (lowercase DNS name), not its content")
    if service_account is not None:
        _check(bool(_DNS1123_SUBDOMAIN.match(service_account)), "service_account",
               f"must be a DNS-1123 name, got {service_account!r}")
    if working_dir is not None:
        _check(bool(working_dir.strip()), "working_dir", "must not be empty")

    container_env = _env(mlflow_uri, env)
    env_from = _env_from(release, s3_secret, mlflow_uri)
    if gpu_image is None:
        gpu_image = image + GPU_SUFFIX if image == DEFAULT_IMAGE else image

    head_params = {"dashboard-host": "0.0.0.0"}
    if num_gpu_workers or cpu_workers:
        head_params["num-cpus"] = "0"
    head_template = _pod_template(
        "ray-head", _container("ray-head", image, head, 0, container_env, env_from, head=True),
        head, service_account)

    groups = []
    if cpu_workers:
        container = _container("ray-worker", image, cpu_worker, 0, container_env, env_from, False)
        groups.append(_worker_group("cpu", cpu_workers, _pod_template(
            "ray-worker-cpu", container, cpu_worker, service_account)))
    if num_gpu_workers:
        container = _container("ray-worker", gpu_image, gpu_worker, gpus_per_worker,
                               container_env, env_from, False)
        gpu_taint = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        groups.append(_worker_group("gpu", num_gpu_workers, _pod_template(
            "ray-worker-gpu", container, gpu_worker, service_account, gpu_taint,
            gpu_node_selector)))

    runtime_env: dict[str, Any] = {}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    runtime_env["env_vars"] = {"PYTHONUNBUFFERED": "1"}

    submitter = {"spec": {
        "restartPolicy": "Never",
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [{
            "name": SUBMITTER_CONTAINER,
            "image": image,
            "resources": copy.deepcopy(SUBMITTER_RESOURCES),
            "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        }],
    }}
    if service_account:
        submitter["spec"]["serviceAccountName"] = service_account

    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": head_params, "template": head_template},
    }
    if groups:
        cluster["workerGroupSpecs"] = groups
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "avsa", "app.kubernetes.io/part-of": "avsa"},
        },
        "spec": {
            "entrypoint": _entrypoint(entrypoint_args),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "backoffLimit": backoff_limit,
            "preRunningDeadlineSeconds": pre_running_deadline_s,
            "activeDeadlineSeconds": active_deadline_s,
            "submitterPodTemplate": submitter,
            "rayClusterSpec": cluster,
        },
    }


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the runtime env) written as `|` blocks."""

def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(obj: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """YAML text of one object, or of several as a multi-document stream, keys in build order."""
    docs = [obj] if isinstance(obj, Mapping) else list(obj)
    return yaml.dump_all([dict(d) for d in docs], Dumper=_Dumper, sort_keys=False,
                         default_flow_style=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `submit`: the parameters of `build_rayjob`, then `--` and the job's argv."""
    parser.add_argument("name", help="RayJob name (DNS label, at most 47 characters)")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--gpu-image", default=None, help="image of GPU workers (default --image)")
    parser.add_argument("--gpu-workers", type=int, default=0)
    parser.add_argument("--gpus-per-worker", type=int, default=1)
    parser.add_argument("--cpu-workers", type=int, default=1)
    parser.add_argument("--release", default="avsa",
                        help="Helm release whose ConfigMap <release>-env gives MLFLOW_TRACKING_URI")
    parser.add_argument("--s3-secret", default=None, help="Secret with AWS_* keys (envFrom)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLFLOW_TRACKING_URI of the pods (default: the release's ConfigMap)")
    parser.add_argument("--working-dir", default=None, help="runtime-env working_dir URI")
    parser.add_argument("--service-account", default=None)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pre-running-deadline", type=int, default=PRE_RUNNING_DEADLINE_S,
                        metavar="S", help="fail when not running after S seconds")
    parser.add_argument("--active-deadline", type=int, default=ACTIVE_DEADLINE_S, metavar="S",
                        help="stop the job after S seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="accepted for old scripts: the YAML is always printed")
    parser.add_argument("entrypoint", nargs="*",
                        help="-- then the job command, e.g. python jobs/pretrain.py k=v")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Build the RayJob from parsed `args` and print it as YAML."""
    out = out or sys.stdout
    argv = list(args.entrypoint)
    if argv and argv[0] == "--":
        argv = argv[1:]
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        _check(bool(sep), "--env", f"expects KEY=VALUE, got {item!r}")
        env[key] = value
    obj = build_rayjob(
        args.name, argv, image=args.image, gpu_image=args.gpu_image,
        num_gpu_workers=args.gpu_workers, gpus_per_worker=args.gpus_per_worker,
        cpu_workers=args.cpu_workers, namespace=args.namespace, s3_secret=args.s3_secret,
        mlflow_uri=args.mlflow_uri, working_dir=args.working_dir, env=env,
        service_account=args.service_account, release=args.release,
        pre_running_deadline_s=args.pre_running_deadline, active_deadline_s=args.active_deadline)
    out.write(to_yaml(obj))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`avsa submit NAME [options] -- COMMAND...` (also `python -m avsa.cluster ...`)."""
    parser = argparse.ArgumentParser(prog="avsa submit", description=__doc__.split("\n")[0])
    add_arguments(parser)
    # Intermixed parsing lets options follow NAME and keeps everything after `--` as the command.
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
