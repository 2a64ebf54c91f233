"""KubeRay RayJob manifests built from parameters, and their submission to a Kubernetes cluster.

`build_rayjob` returns a plain dict (a `ray.io/v1` RayJob) that `to_yaml` prints for
`kubectl apply -f -`; `submit_rayjob` creates it through the Kubernetes API and follows it. The
`kubernetes` package is imported only on submission, so building and printing need no cluster.

    python -m avsa.cluster avsa-pretrain --gpu-workers 4 --s3-secret avsa-s3 --dry-run -- \
        python jobs/pretrain.py experiment=avsa_yt360 storage=s3 storage.path=s3://b/runs
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from avsa.errors import AvsaError, ConfigError

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
SUBMITTER_CONTAINER = "ray-job-submitter"
# KubeRay appends 6 characters to a RayJob name to name its RayCluster, which may have 53.
MAX_RAYJOB_NAME = 47
TERMINAL_DEPLOYMENT_STATES = ("Complete", "Failed")

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
    "runAsUser": 1000,  # the `ray` user of the rayproject/ray images
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
    The shm volume counts against the memory limit, so keep it well below `memory`.
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
    image: str,
    num_gpu_workers: int,
    gpus_per_worker: int,
    cpu_workers: int,
    namespace: str,
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
) -> dict[str, Any]:
    """A `ray.io/v1` RayJob that starts its own cluster, runs one command and shuts down.

    entrypoint_args: the job's argv, e.g. ["python", "jobs/pretrain.py", "experiment=avsa_yt360"]
        (a leading "*.py" gets "python" prepended); arguments are shell-quoted.
    num_gpu_workers x gpus_per_worker GPUs go to the `gpu` group (omitted when 0); `cpu_workers`
    pods form the `cpu` group for decoding (omitted when 0). With no worker at all the head
    advertises its CPUs, otherwise it keeps `num-cpus: 0` and only hosts the driver.
    s3_secret: name of a Secret whose keys become environment variables (envFrom).
    mlflow_uri: MLFLOW_TRACKING_URI of every Ray container; env: more plain variables (names
    that look like credentials are refused). working_dir: runtime-env working_dir, a URI Ray can
    fetch (s3://bucket/avsa.zip) or a path inside the image.
    Raises ConfigError naming the first bad argument.
    """
    _check(isinstance(name, str) and bool(_DNS1035.match(name)) and len(name) <= MAX_RAYJOB_NAME,
           "name", f"must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters, got {name!r}")
    _check(isinstance(namespace, str) and bool(_DNS1123_LABEL.match(namespace))
           and len(namespace) <= 63, "namespace", f"must be a DNS-1123 label, got {namespace!r}")
    _check(bool(image), "image", "must not be empty")
    for key, value in (("num_gpu_workers", num_gpu_workers), ("cpu_workers", cpu_workers),
                       ("backoff_limit", backoff_limit),
                       ("ttl_seconds_after_finished", ttl_seconds_after_finished)):
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
    env_from = [{"secretRef": {"name": s3_secret}}] if s3_secret else []

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
        container = _container("ray-worker", gpu_image or image, gpu_worker, gpus_per_worker,
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


def _clients() -> tuple[Any, Any, type[Exception]]:
    """(CustomObjectsApi, CoreV1Api, ApiException) from the kubeconfig or in-cluster config."""
    try:
        from kubernetes import client, config
    except ImportError as e:
        raise AvsaError("kubernetes: the python package is not installed") from e
    where = os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        config.load_kube_config(config_file=where)
    except Exception as kube_error:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            reason = str(kube_error).replace("\n", " ")
            raise AvsaError(f"{where}: no usable kubeconfig and not inside a cluster ({reason})"
                            ) from kube_error
    return client.CustomObjectsApi(), client.CoreV1Api(), client.ApiException


def _api_error(error: Any, namespace: str, name: str) -> AvsaError:
    where = f"rayjobs.{GROUP}/{VERSION} {namespace}/{name}"
    if error.status == 404:
        return AvsaError(f"{where}: not found (is the KubeRay operator installed?)")
    if error.status == 409:
        return AvsaError(f"{where}: already exists; delete it or pick another name")
    return AvsaError(f"{where}: {error.status} {error.reason}")


def _stream_submitter_logs(core: Any, namespace: str, name: str, out: TextIO) -> bool:
    """Copy the submitter pod's log (the job's output) to `out` until it ends; False while the
    pod has not started yet."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    started = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
    if not started:
        return False
    stream = core.read_namespaced_pod_log(started[-1].metadata.name, namespace, follow=True,
                                          _preload_content=False)
    for chunk in stream.stream():
        out.write(chunk.decode("utf-8", errors="replace"))
        out.flush()
    return True


def submit_rayjob(obj: Mapping[str, Any], namespace: str, follow: bool = True, *,
                  poll_s: float = 5.0, timeout_s: float | None = None,
                  out: TextIO | None = None) -> dict[str, Any]:
    """Create the RayJob in `namespace`; with `follow`, print status changes and the job's log
    until KubeRay reports it Complete or Failed.

    Returns the RayJob's `status` (empty right after creation when not following). Raises
    AvsaError without a usable kubeconfig, when the API refuses the object, when the job fails,
    or after `timeout_s` seconds.
    """
    out = out or sys.stdout
    name = obj["metadata"]["name"]
    custom, core, api_exception = _clients()
    body = copy.deepcopy(dict(obj))
    body["metadata"]["namespace"] = namespace
    try:
        created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except api_exception as e:
        raise _api_error(e, namespace, name) from e
    print(f"rayjob {namespace}/{name}: created", file=out)
    if not follow:
        return dict(created.get("status") or {})

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: tuple[Any, Any] | None = None
    logs_done = False
    while True:
        try:
            current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except api_exception as e:
            raise _api_error(e, namespace, name) from e
        status = dict(current.get("status") or {})
        state = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if state != last:
            print(f"rayjob {namespace}/{name}: deployment={state[0]} job={state[1]}", file=out)
            last = state
        if not logs_done:
            try:
                logs_done = _stream_submitter_logs(core, namespace, name, out)
            except api_exception as e:
                print(f"rayjob {namespace}/{name}: log stream interrupted ({e.status})", file=out)
        if state[0] in TERMINAL_DEPLOYMENT_STATES:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise AvsaError(f"rayjob {namespace}/{name}: still {state[0]} after {timeout_s} s")
        time.sleep(poll_s)
    if state[0] == "Failed" or state[1] != "SUCCEEDED":
        message = str(status.get("message", "")).replace("\n", " ")
        raise AvsaError(f"rayjob {namespace}/{name}: {state[1]} ({state[0]}) {message}".rstrip())
    return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `submit`: the parameters of `build_rayjob`, then `--` and the job's argv."""
    parser.add_argument("name", help="RayJob name (DNS label, at most 47 characters)")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--gpu-image", default=None, help="image of GPU workers (default --image)")
    parser.add_argument("--gpu-workers", type=int, default=0)
    parser.add_argument("--gpus-per-worker", type=int, default=1)
    parser.add_argument("--cpu-workers", type=int, default=1)
    parser.add_argument("--s3-secret", default=None, help="Secret with AWS_* keys (envFrom)")
    parser.add_argument("--mlflow-uri", default=None, help="MLFLOW_TRACKING_URI of the pods")
    parser.add_argument("--working-dir", default=None, help="runtime-env working_dir URI")
    parser.add_argument("--service-account", default=None)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="print the RayJob YAML and exit")
    parser.add_argument("--no-follow", action="store_true", help="return once created")
    parser.add_argument("entrypoint", nargs="*",
                        help="-- then the job command, e.g. python jobs/pretrain.py k=v")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Build the RayJob from parsed `args`, then print it (--dry-run) or submit it."""
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
        service_account=args.service_account)
    if args.dry_run:
        out.write(to_yaml(obj))
        return 0
    submit_rayjob(obj, args.namespace, follow=not args.no_follow, out=out)
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
    except AvsaError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
