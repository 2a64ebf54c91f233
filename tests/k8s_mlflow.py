"""k8s/base/mlflow.yaml, rendered from the Helm chart so that k8s/ and the chart share one MLflow:
its ServiceAccount (no token), claim, Service and Deployment (with the `mlflow db upgrade` init
container), as the chart makes them for a release named `avsa`, minus Helm's own labels.

    .venv/bin/python tests/k8s_mlflow.py > k8s/base/mlflow.yaml

`tests/test_k8s.py` checks that the file is what this prints.
"""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "avsa"
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
               "app.kubernetes.io/version")
HEADER = """# MLflow for k8s/ (SQLite on a claim, artifacts served from it): generated from the Helm chart
# by `.venv/bin/python tests/k8s_mlflow.py > k8s/base/mlflow.yaml`; do not edit by hand.
"""


def _strip(node):
    """`node` without Helm's labels in any labels, matchLabels or Service selector."""
    if isinstance(node, list):
        return [_strip(v) for v in node]
    if not isinstance(node, dict):
        return node
    return {k: ({n: v for n, v in val.items() if n not in HELM_LABELS}
                if k in ("labels", "matchLabels", "selector") and isinstance(val, dict)
                and "matchLabels" not in val else _strip(val))
            for k, val in node.items()}


def render() -> str:
    with helm.Chart.load(CHART) as chart:
        out = chart.render({"fullnameOverride": "avsa", "serviceAccount": {"create": False},
                            "mlflow": {"persistence": {"keepOnUninstall": False}}},
                           name="avsa", namespace="avsa", is_install=True)
    docs = [d for p, t in sorted(out.items()) if p.endswith(".yaml")
            for d in yaml.safe_load_all(t) if d]
    mlflow = [_strip(d) for d in docs
              if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "mlflow"]
    order = {"ServiceAccount": 0, "PersistentVolumeClaim": 1, "Service": 2, "Deployment": 3}
    mlflow.sort(key=lambda d: order[d["kind"]])
    return HEADER + yaml.safe_dump_all(mlflow, sort_keys=False)


if __name__ == "__main__":
    print(render(), end="")
