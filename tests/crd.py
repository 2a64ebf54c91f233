"""Checks of KubeRay objects (RayCluster, RayJob) without an API server, for the tests of the
chart, k8s/ and `avsa submit`.

The API server validates a custom resource against the `openAPIV3Schema` of its CRD; these
functions apply the same schema with `jsonschema`, closed to unknown fields as the server's
strict field validation is (a typo such as `replica` fails here instead of being dropped
silently). The pod templates inside are checked against the Kubernetes schemas.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from avsa.errors import ConfigError

CRDS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"
RAYCLUSTER_CRD = CRDS / "ray.io_rayclusters.yaml"
RAYJOB_CRD = CRDS / "ray.io_rayjobs.yaml"
K8S_VERSION = "1.30.0"
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRD schemas absent: {CRDS}")


def pod_templates(obj: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for every pod template of a RayCluster or RayJob dict."""
    spec = obj["spec"]
    if obj["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        spec, prefix = spec.get("rayClusterSpec", {}), "spec.rayClusterSpec"
    else:
        prefix = "spec"
    if "headGroupSpec" in spec:
        yield f"{prefix}.headGroupSpec.template", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs") or []:
        yield f"{prefix}.workerGroupSpecs[{group['groupName']}].template", group["template"]


def validate_pod_templates(obj: Mapping[str, Any]) -> None:
    """Check every pod template of a RayCluster or RayJob dict against the Kubernetes schema
    (strict: unknown fields fail), wrapped in a PodTemplate named after where it sits."""
    for where, template in pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": re.sub(r"[^a-z0-9-]", "-", where.lower())[:63]},
                   "template": template}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def _closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever properties are listed and unknown
    fields are not preserved, mirroring the API server's strict field validation."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_spec_schema(crd_path: str | Path, version: str = "v1") -> dict[str, Any]:
    """JSON schema of `spec` of one version of a CustomResourceDefinition file, closed to
    unknown fields. Raises ConfigError when the file holds no such version."""
    path = Path(crd_path).resolve()
    schemas = _crd_spec_schemas(path)
    if version not in schemas:
        raise ConfigError(path, f"no openAPIV3Schema for spec of version {version}; "
                                f"the file has {sorted(schemas)}")
    return schemas[version]


@functools.cache
def _crd_spec_schemas(path: Path) -> dict[str, dict[str, Any]]:
    """version -> closed spec schema. CRDs are megabytes of YAML: parsed with libyaml when
    present, once per file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        crd = yaml.load(path.read_text(), Loader=loader)
        return {v["name"]: _closed(v["schema"]["openAPIV3Schema"]["properties"]["spec"])
                for v in crd["spec"]["versions"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(path, f"not a CustomResourceDefinition with spec schemas: {e!r}") from e


def validate_spec(obj: Mapping[str, Any], crd_path: str | Path) -> None:
    """Check `obj["spec"]` against the CRD in `crd_path` (e.g. KubeRay's ray.io_rayjobs.yaml).

    Raises ConfigError naming the CRD file and the first offending field path.
    """
    schema = crd_spec_schema(crd_path, obj["apiVersion"].split("/")[-1])
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(obj["spec"]))
    if error is not None:
        where = ".".join(["spec", *map(str, error.absolute_path)])
        raise ConfigError(crd_path, f"{obj['kind']} {where}: {error.message}".replace("\n", " "))
