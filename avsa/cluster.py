"""`avsa submit`: one KubeRay RayJob sized by flags, printed for `kubectl create -f -`.

Sizing a one-off job (workers, GPUs, image, S3 Secret, tracking URI, deadlines) with `kubectl
apply -k` means editing YAML. This module loads the RayJob k8s/ applies (`k8s/jobs/rayjob/`,
with the `gpu` worker group of `k8s/components/gpu-cloud`) and patches what the flags set:

    avsa submit avsa-pretrain -n avsa --gpu-workers 4 --s3-secret avsa-s3 -- \
        python jobs/pretrain.py experiment=avsa_yt360 storage=s3 storage.path=s3://b/runs \
      | kubectl create -n avsa -f -

Without `--mlflow-uri` the pods read MLFLOW_TRACKING_URI (and the S3 settings) from the Helm
release's ConfigMap `<release>-env`, the same one the chart's RayCluster reads.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from avsa.errors import ConfigError

# Inside k8s/: the shared RayJob, and the JSON 6902 patch whose `add` brings the `gpu` group.
RAYJOB = Path("jobs/rayjob/rayjob.yaml")
GPU_WORKERS = Path("components/gpu-cloud/gpu-workers.yaml")
# KubeRay appends 6 characters to a RayJob name to name its RayCluster, which may have 53.
MAX_RAYJOB_NAME = 47

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# Environment names that hold credentials; those belong in the Secret named by `s3_secret`.
_SECRET_ENV = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY|_KEY$", re.IGNORECASE
)


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


def _load_yaml(path: Path) -> Any:
    # Through JSON: YAML anchors (`&podSecurity`) would otherwise share one dict between pods,
    # so a patch of one pod would change them all.
    return json.loads(json.dumps(yaml.safe_load(path.read_text())))


def load_sources() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the shared RayJob, the `gpu` worker group) as k8s/ writes them, fresh dicts each call,
    from the `k8s/` tree beside the package (a checkout and its editable install), else the one
    in the working directory. Raises ConfigError when neither holds the shared RayJob."""
    candidates = [Path(__file__).resolve().parent.parent / "k8s", Path.cwd() / "k8s"]
    root = next((c for c in candidates if (c / RAYJOB).is_file()), None)
    _check(root is not None, "k8s", f"no {RAYJOB} in {' or '.join(map(str, candidates))}")
    ops = _load_yaml(root / GPU_WORKERS)
    (gpu,) = [op["value"] for op in ops
              if op["op"] == "add" and op["path"].endswith("/workerGroupSpecs/-")]
    return _load_yaml(root / RAYJOB), gpu


def _entrypoint(args: Sequence[str]) -> str:
    """Shell command of the job: `python` is prepended when the first argument is a .py file."""
    _check(not isinstance(args, str) and len(args) > 0 and all(isinstance(a, str) for a in args),
           "entrypoint_args", f"must be a non-empty list of strings, got {args!r}")
    return shlex.join(["python", *args] if args[0].endswith(".py") else args)


def _env(release: str, s3_secret: str | None, mlflow_uri: str | None,
         env: Mapping[str, str] | None) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(env, envFrom) of the Ray containers: the tracking URI and `env`, or without a URI the
    release's ConfigMap (tracking URI, S3 settings); then the S3 Secret. Not optional: a pod
    without them stops instead of running unrecorded."""
    values: list[dict[str, str]] = []
    refs: list[dict[str, Any]] = []
    if mlflow_uri:
        _check("@" not in mlflow_uri, "mlflow_uri",
               "must not embed credentials (user:password@); use MLFLOW_TRACKING_TOKEN in a Secret")
        values.append({"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri})
    else:
        refs.append({"configMapRef": {"name": f"{release}-env"}})
    if s3_secret:
        refs.append({"secretRef": {"name": s3_secret}})
    for key, value in sorted((env or {}).items()):
        _check(bool(_ENV_NAME.match(key)), f"env.{key}", "is not a valid environment variable name")
        _check(not _SECRET_ENV.search(key), f"env.{key}",
               "looks like a credential; put it in the Secret that --s3-secret names instead")
        values.append({"name": key, "value": str(value)})
    return values, refs


def build_rayjob(
    name: str,
    entrypoint_args: Sequence[str],
    *,
    namespace: str,
    image: str | None = None,
    gpu_image: str | None = None,
    num_gpu_workers: int = 0,
    gpus_per_worker: int = 1,
    cpu_workers: int = 1,
    release: str = "avsa",
    s3_secret: str | None = None,
    mlflow_uri: str | None = None,
    working_dir: str | None = None,
    env: Mapping[str, str] | None = None,
    service_account: str | None = None,
    pre_running_deadline_s: int | None = None,
    active_deadline_s: int | None = None,
) -> dict[str, Any]:
    """The RayJob of k8s/ renamed and patched by the arguments (None keeps k8s/'s value); pod
    resources, security contexts, token auth and the Ray version stay k8s/'s.

    entrypoint_args: the job's argv (a leading "*.py" gets "python"). A worker group with a
    count of 0 is omitted; with no workers the head runs the tasks. gpu_image defaults to
    k8s/'s while `image` is k8s/'s, else to `image` + "-gpu". Without mlflow_uri the pods read
    the Helm release's ConfigMap `<release>-env`; env names that look like credentials are
    refused. Raises ConfigError naming the first bad argument.
    """
    _check(isinstance(name, str) and bool(_DNS1035.match(name)) and len(name) <= MAX_RAYJOB_NAME,
           "name", f"must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters, got {name!r}")
    _check(isinstance(namespace, str) and bool(_DNS1123_LABEL.match(namespace))
           and len(namespace) <= 63, "namespace", f"must be a DNS-1123 label, got {namespace!r}")
    _check(image is None or bool(image), "image", "must not be empty")
    _check(isinstance(release, str) and bool(_DNS1123_LABEL.match(release)), "release",
           f"must be the name of a Helm release (DNS-1123 label), got {release!r}")
    for key, value in (("num_gpu_workers", num_gpu_workers), ("cpu_workers", cpu_workers),
                       ("pre_running_deadline_s", pre_running_deadline_s),
                       ("active_deadline_s", active_deadline_s)):
        _check(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                 and value >= 0), key, f"must be an integer >= 0, got {value!r}")
    _check(isinstance(gpus_per_worker, int) and gpus_per_worker >= (1 if num_gpu_workers else 0),
           "gpus_per_worker", f"must be an integer >= 1 with GPU workers, got {gpus_per_worker!r}")
    _check(s3_secret is None or (bool(_DNS1123_SUBDOMAIN.match(s3_secret))
                                 and len(s3_secret) <= 253), "s3_secret",
           "must be the name of a Kubernetes Secret (lowercase DNS name), not its content")
    _check(service_account is None or bool(_DNS1123_SUBDOMAIN.match(service_account)),
           "service_account", f"must be a DNS-1123 name, got {service_account!r}")
    _check(working_dir is None or bool(working_dir.strip()), "working_dir", "must not be empty")
    ray_env, env_from = _env(release, s3_secret, mlflow_uri, env)
    job, gpu = load_sources()
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    (cpu,) = cluster["workerGroupSpecs"]

    default_image = head["template"]["spec"]["containers"][0]["image"]
    image = image or default_image
    if gpu_image is None:  # REGISTRY/avsa:TAG-gpu: the CUDA build of REGISTRY/avsa:TAG
        gpu_image = (gpu["template"]["spec"]["containers"][0]["image"] if image == default_image
                     else f"{image}-gpu")
    for part in gpu["template"]["spec"]["containers"][0]["resources"].values():
        part["nvidia.com/gpu"] = gpus_per_worker

    groups = []
    for group, count in ((cpu, cpu_workers), (gpu, num_gpu_workers)):
        if count:
            group.update(replicas=count, minReplicas=count, maxReplicas=count)
            groups.append(group)
    if groups:
        cluster["workerGroupSpecs"] = groups
    else:  # the head runs the tasks itself
        del cluster["workerGroupSpecs"]
        head["rayStartParams"].pop("num-cpus", None)

    for group, group_image in ((head, image), (cpu, image), (gpu, gpu_image)):
        (container,) = group["template"]["spec"]["containers"]
        container["image"] = group_image
        if env_from:
            container["envFrom"] = copy.deepcopy(env_from)
        else:
            container.pop("envFrom", None)
        if ray_env:
            container["env"] = copy.deepcopy(ray_env)
    spec["submitterPodTemplate"]["spec"]["containers"][0]["image"] = image
    if service_account:
        for pod in (spec["submitterPodTemplate"], head["template"], cpu["template"], gpu["template"]):
            pod["spec"]["serviceAccountName"] = service_account

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env.pop("working_dir", None)
    if working_dir:
        runtime_env = {"working_dir": working_dir, **runtime_env}
    spec["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    for key, value in (("preRunningDeadlineSeconds", pre_running_deadline_s),
                       ("activeDeadlineSeconds", active_deadline_s)):
        if value is not None:
            spec[key] = value
    job["metadata"] = {"name": name, "namespace": namespace, "labels": job["metadata"]["labels"]}
    job["spec"] = {"entrypoint": _entrypoint(entrypoint_args), **spec}
    return job


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the runtime env) written as `|` blocks."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _Dumper.represent_str)


def to_yaml(obj: Mapping[str, Any]) -> str:
    """YAML of one object, keys in build order."""
    return yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=False)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """`avsa submit NAME [options] -- COMMAND...` (also `python -m avsa.cluster ...`): print the
    RayJob that `build_rayjob` makes of the options as YAML."""
    parser = argparse.ArgumentParser(prog="avsa submit", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="RayJob name (DNS label, at most 47 characters)")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--image", help="image of the head, CPU workers and submitter "
                        "(default: k8s/'s, the image the Dockerfile builds)")
    parser.add_argument("--gpu-image", help="image of GPU workers (default: k8s/'s GPU image, "
                        "or --image with -gpu appended)")
    parser.add_argument("--gpu-workers", dest="num_gpu_workers", metavar="GPU_WORKERS", type=int,
                        default=0)
    parser.add_argument("--gpus-per-worker", type=int, default=1)
    parser.add_argument("--cpu-workers", type=int, default=1)
    parser.add_argument("--release", default="avsa",
                        help="Helm release whose ConfigMap <release>-env gives MLFLOW_TRACKING_URI")
    parser.add_argument("--s3-secret", help="Secret with AWS_* keys (envFrom)")
    parser.add_argument("--mlflow-uri",
                        help="MLFLOW_TRACKING_URI of the pods (default: the release's ConfigMap)")
    parser.add_argument("--working-dir", help="runtime-env working_dir URI")
    parser.add_argument("--service-account")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pre-running-deadline", dest="pre_running_deadline_s", type=int,
                        metavar="S", help="fail when not running after S seconds (default: k8s/'s)")
    parser.add_argument("--active-deadline", dest="active_deadline_s", type=int, metavar="S",
                        help="stop the job after S seconds (default: k8s/'s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="accepted for old scripts: the YAML is always printed")
    parser.add_argument("entrypoint", nargs="*",
                        help="-- then the job command, e.g. python jobs/pretrain.py k=v")
    # Intermixed parsing lets options follow NAME and keeps everything after `--` as the command.
    args = vars(parser.parse_intermixed_args(argv))
    del args["dry_run"]
    command = args.pop("entrypoint")
    if command[:1] == ["--"]:
        command = command[1:]
    env = {}
    for item in args.pop("env"):
        key, sep, value = item.partition("=")
        _check(bool(sep), "--env", f"expects KEY=VALUE, got {item!r}")
        env[key] = value
    try:
        obj = build_rayjob(args.pop("name"), command, env=env, **args)
    except ConfigError as e:  # name the flag the user typed, not the builder's parameter
        flag = _FLAGS.get(e.where, "--" + e.where.replace("_", "-")) if e.where in args else None
        if e.where.startswith("env."):
            flag = f"--env {e.where.removeprefix('env.')}"
        raise ConfigError(flag or e.where, e.reason) from None
    (out or sys.stdout).write(to_yaml(obj))
    return 0


# build_rayjob parameters whose flag is not "--" + the name with dashes
_FLAGS = {"num_gpu_workers": "--gpu-workers", "pre_running_deadline_s": "--pre-running-deadline",
          "active_deadline_s": "--active-deadline"}


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
