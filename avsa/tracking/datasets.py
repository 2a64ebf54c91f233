"""A run's input shards as MLflow datasets (the runs table's Dataset column), described by
their manifest: name from folder and split, digest from the shards' names and checksums (the
same bytes, the same digest), source the shard folder, profile the counts; the context
(``train``, ``val``, ``test``) as MLflow's ``mlflow.data.context`` tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from typing import TYPE_CHECKING, Any

from avsa.data.manifest import Manifest, read_manifest, shard_dir
from avsa.errors import AvsaError

if TYPE_CHECKING:
    from avsa.tracking.run import RunLogger

log = logging.getLogger("avsa.tracking")


def manifest_digest(manifest: Manifest) -> str:
    """Hex digest of the shards' names and checksums, in manifest order."""
    text = "".join(f"{s.name}\0{s.sha256}\n" for s in manifest.shards)
    return hashlib.sha256(text.encode()).hexdigest()[:16]  # MLflow stores at most 36


def dataset_name(uri: str, manifest: Manifest) -> str:
    """The last two folders of the shard set's URI (``shards/train``), then its split if
    they do not name it: ``yt360/shards (val)``."""
    parts = [p for p in shard_dir(uri).split("://")[-1].split("/") if p]
    name = "/".join(parts[-2:]) or "shards"
    return name if manifest.split in parts[-2:] else f"{name} ({manifest.split})"


def shard_dataset(uri: str, manifest: Manifest):
    """An ``mlflow.data`` dataset describing the shard set at ``uri``."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return {"num_samples": manifest.total_samples, "num_shards": len(manifest.shards),
                    "num_bytes": sum(s.bytes for s in manifest.shards)}

        def to_dict(self) -> dict[str, str]:  # MetaDataset leaves the profile out
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(shard_dir(uri))
    return ShardDataset(source, name=dataset_name(uri, manifest), digest=manifest_digest(manifest))


def dataset_inputs(shards: list[tuple[str | None, str]]) -> list:
    """``[(uri, context)]`` -> MLflow ``DatasetInput`` entities; a URI with no readable
    manifest (e.g. a UCF101 folder) is left out with a debug line."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = []
    for uri, context in shards:
        if not uri:
            continue
        try:
            manifest = read_manifest(uri)
        except AvsaError as e:
            log.debug("no dataset logged for %s: %s", uri, e)
            continue
        entity = shard_dataset(uri, manifest)._to_mlflow_entity()
        out.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out


def log_datasets(logger: RunLogger, shards: list[tuple[str | None, str]]) -> bool:
    """Log the shard sets ``[(uri, context)]`` as the run's inputs; warns (never raises) when
    the server cannot take them. True when logged (or nothing to log)."""
    inputs = dataset_inputs(shards)
    if not inputs:
        return True
    names = json.dumps([i.dataset.name for i in inputs])
    return logger.attempt(f"datasets {names}",
                          lambda client: client.log_inputs(logger.run_id, datasets=inputs))
