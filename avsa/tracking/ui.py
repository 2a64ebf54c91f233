"""Addresses in the MLflow UI that open where avsa's runs are.

MLflow 3.17's UI has one global switch between "GenAI" and "Model training" that defaults to
GenAI and, on an experiment's own page, wins over the experiment's ``mlflow.experimentKind``
tag: ``#/experiments/<id>`` opens on the traces overview. The query ``workflowType=
machine_learning`` selects "Model training", so these addresses open on the runs table.
"""

from __future__ import annotations

WORKFLOW = "workflowType=machine_learning"


def experiment_page(ui: str, experiment_id: str | None) -> str:
    """The runs table of ``experiment_id`` (the experiment list without one) at ``ui``."""
    base = ui.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{WORKFLOW}"
    return f"{base}/#/experiments/{experiment_id}?{WORKFLOW}"


def runs_page(tracking_uri: str, experiment: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The runs table of the experiment named ``experiment`` in the store ``tracking_uri``,
    served at ``ui``; the experiment list if it does not exist (or cannot be read)."""
    from avsa.tracking.client import connect
    from avsa.tracking.store import experiment_id

    try:
        exp_id = experiment_id(connect(tracking_uri), tracking_uri, experiment, create=False)
    except Exception:
        exp_id = None
    return experiment_page(ui, exp_id)
