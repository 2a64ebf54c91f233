"""Addresses in the MLflow UI that open where avsa's runs are.

MLflow 3.17's UI has one global switch between "GenAI" and "Model training" that defaults to
GenAI and, on an experiment's own page, wins over the experiment's ``mlflow.experimentKind``
tag: ``#/experiments/<id>`` opens on the traces overview. The query ``workflowType=
machine_learning`` selects "Model training", so these addresses open on the runs table.
"""

from __future__ import annotations

WORKFLOW = "workflowType=machine_learning"


def runs_page(tracking_uri: str, experiment: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The runs table of the experiment named ``experiment`` in the store ``tracking_uri``,
    served at ``ui``; the experiment list if it does not exist (or cannot be read)."""
    from avsa.tracking.client import connect
    from avsa.tracking.store import experiment_id

    try:
        exp_id = experiment_id(connect(tracking_uri), tracking_uri, experiment, create=False)
    except Exception:
        exp_id = None
    page = "experiments" if exp_id is None else f"experiments/{exp_id}"
    return f"{ui.rstrip('/')}/#/{page}?{WORKFLOW}"
