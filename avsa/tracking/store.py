"""Experiments and runs in the tracking store: the tags that link runs, and finding them.
All through MlflowClient with explicit run ids (safe in threads and Ray workers); failures
raise TrackingError naming the store.
"""

from __future__ import annotations

from avsa.errors import TrackingError
from avsa.tracking.client import connect, one_line, reading, redact, sqlite_path

# Tags linking runs together.
KIND = "avsa.kind"  # pretrain | sweep | trial | transfer
TASK = "avsa.task"
PRETRAIN_RUN = "avsa.pretrain_run_id"
CHECKPOINT = "avsa.checkpoint_uri"
RUN_URI = "avsa.run_uri"  # a pretraining's (or trial's) run directory
BEST_RUN = "avsa.best_run_id"  # on a sweep's run: its best trial's run
PARENT = "mlflow.parentRunId"
SYSTEM = "system/"  # the prefix of system-metric keys, sampled on their own steps from 1
# The experiment tag MLflow 3's UI reads to open an experiment on its runs table ("Model
# training") instead of the GenAI views (traces).
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_VALUE = "custom_model_development"


def experiment_id(mlflow_client, uri: str, name: str, *, create: bool) -> str | None:
    """The id of experiment ``name``; with ``create``, made (or restored) if missing, with
    its artifacts next to a SQLite database. None when missing and not ``create``."""
    exp = mlflow_client.get_experiment_by_name(name)
    if not create:
        return None if exp is None or exp.lifecycle_stage == "deleted" else exp.experiment_id
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND not in exp.tags:  # a kind someone chose is kept
            mlflow_client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND,
                                             EXPERIMENT_KIND_VALUE)
        return exp.experiment_id
    db = sqlite_path(uri)  # artifacts next to it, not relative to whoever creates them
    location = None if db is None else (db.parent / "artifacts").resolve().as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.create_experiment(name, artifact_location=location,
                                               tags={EXPERIMENT_KIND: EXPERIMENT_KIND_VALUE})
    except MlflowException:  # another process created it first
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _quote(uri: str, value: str) -> str:
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    raise TrackingError(redact(uri), f"run name {value!r} holds both quote characters")


def find_run(uri: str, experiment: str, run_name: str, run_uri: str | None = None) -> str | None:
    """Id of the newest active run named ``run_name`` in ``experiment``, and with ``run_uri``
    tagged as its run directory (RUN_URI) when given; None if none."""
    uri = str(uri)
    mlflow_client = connect(uri)

    def search() -> str | None:
        exp_id = experiment_id(mlflow_client, uri, experiment, create=False)
        if exp_id is None:
            return None
        # the directory is compared here: a filter string cannot quote a path holding both ' and "
        runs = mlflow_client.search_runs(
            [exp_id],
            filter_string=f"attributes.run_name = {_quote(uri, run_name)}",
            max_results=1 if run_uri is None else 1000,
            order_by=["attributes.start_time DESC"],
        )
        return next((r.info.run_id for r in runs
                     if run_uri is None or r.data.tags.get(RUN_URI) == run_uri), None)

    return reading(uri, f"finding run {run_name!r} in experiment {experiment!r}", search)


def get_run(uri: str, run_id: str):
    """The :class:`mlflow.entities.Run`; TrackingError if it does not exist."""
    from mlflow.exceptions import MlflowException

    uri = str(uri)
    try:
        return connect(uri).get_run(run_id)
    except Exception as e:
        if isinstance(e, MlflowException) and (e.get_http_status_code() == 404
                                               or e.error_code == "RESOURCE_DOES_NOT_EXIST"):
            raise TrackingError(redact(uri), f"no run {run_id}") from e
        raise TrackingError(redact(uri), f"reading run {run_id} failed ({one_line(e)})") from e


def last_logged_step(uri: str, run_id: str, system: bool = False) -> int:
    """The largest step a metric of the run was logged at (0 for none), training steps and
    system-metric samples (keys under SYSTEM, `system=True`) apart."""
    mlflow_client = connect(str(uri))
    run = get_run(uri, run_id)
    keys = [k for k in run.data.metrics if k.startswith(SYSTEM) == system]
    if system:
        keys = keys[:1]  # every system metric is sampled at the same steps

    def last() -> int:
        steps = [int(m.step) for key in keys for m in mlflow_client.get_metric_history(run_id, key)]
        return max([0, *steps])

    return reading(uri, f"reading the metric history of run {run_id}", last)


def running_children(uri: str, parent_run_id: str) -> list[str]:
    """Ids of the RUNNING runs whose parent is ``parent_run_id`` (a sweep's trials)."""
    parent = get_run(uri, parent_run_id)
    runs = reading(uri, f"listing the running children of run {parent_run_id}",
                   lambda: connect(str(uri)).search_runs(
                       [parent.info.experiment_id],
                       filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                     f"attributes.status = 'RUNNING'", max_results=1000))
    return [r.info.run_id for r in runs]
