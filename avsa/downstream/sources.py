"""Where transfer tasks read their clips: shard splits through the input pipeline.

A source yields batches of torch tensors, the pipeline's format: video (B, V, 3, T, S, S)
uint8, audio (B, V, C, F, M), directions (B, V, 2), labels (B, K), optional aligned (B,) and
masks (B, V, S, S), plus "key" (list of B sample keys). `train(epoch)` is augmented and
shuffled, each epoch with its own windows and viewpoints; `test(pass_index)` is not augmented,
in manifest order, and each pass draws other windows and viewpoints of the same clips.
`train_labels()` gives the training clips' labels (N, K) up front, for a source that does not
declare `single_label`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from avsa.config import DataConfig
from avsa.data.labels import CLASSES

log = logging.getLogger(__name__)

# Test passes use another seed than training, so even a test split equal to the training
# split is seen through windows and viewpoints the head never trained on.
TEST_SEED_OFFSET = 1_000_003


@dataclass
class ShardSource:
    """Train and test splits as shard sets (manifest URIs or folders, local or s3://)."""

    train_uri: str
    test_uri: str
    data: DataConfig
    batch_size: int
    seed: int = 0
    misalign_prob: float = 0.0
    with_masks: bool = False
    single_label: bool = False  # synthetic labels are multi-hot (every class present)
    class_names: tuple[str, ...] = CLASSES  # label index -> name: the synthetic classes
    # Decoded batches kept by the caller across transfers of the same clips (several heads,
    # seeds or pretrained networks): key -> list of batches. None decodes every time.
    memo: dict | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        """Classes of the labels, without background."""
        return len(self.class_names)

    @classmethod
    def from_config(cls, data: DataConfig, batch_size: int, **kw: Any) -> ShardSource:
        """data.shards trains; data.val_shards tests (the training shards when it is unset).
        Both manifests are read here, so a missing or unreadable set fails before any work."""
        from avsa.config_checks import short_clips_warning
        from avsa.data.manifest import read_manifest

        test = data.val_shards
        if not test:
            log.warning("data.val_shards is unset: testing on %s, the training shards (other "
                        "windows and viewpoints, same clips)", data.shards)
            test = data.shards
        for uri in dict.fromkeys((data.shards, test)):
            if warning := short_clips_warning(uri, read_manifest(uri).min_seconds, data):
                log.warning(warning)
        return cls(data.shards, test, data, batch_size, seed=data.seed, **kw)

    def _iter(self, uri: str, data: DataConfig, *, epoch: int, seed: int, shuffle: bool):
        from avsa.data.pipeline import iter_local

        batches = iter_local(
            uri, data, epochs=1, start_epoch=epoch, seed=seed, batch_size=self.batch_size,
            shuffle=shuffle, misalign_prob=self.misalign_prob, with_masks=self.with_masks,
        )
        if self.memo is None:
            return batches
        key = (uri, repr(data), epoch, seed, shuffle, self.batch_size, self.misalign_prob,
               self.with_masks)
        if key not in self.memo:
            self.memo[key] = list(batches)
        return iter(self.memo[key])

    def train_labels(self):
        """(N, K) float32 labels of the training clips, read from their json members alone (no
        media decoded), so a task can choose its loss before the first batch. Samples whose
        json training would skip are left out, and so are unreadable shards when
        data.skip_missing_shards is set."""
        import numpy as np
        import torch

        from avsa.data import labels
        from avsa.data.manifest import read_manifest, shard_uris
        from avsa.data.shards import open_shard
        from avsa.errors import AvsaError, MediaError

        man, rows = read_manifest(self.train_uri), []
        for uri, info in zip(shard_uris(self.train_uri, man), man.shards):
            try:
                for raw in open_shard(uri, info, verify=False):
                    if "json" not in raw.members:
                        continue
                    try:
                        meta = labels.parse_meta(raw.members["json"], raw.key)
                        rows.append(labels.label_vector(meta, raw.key))
                    except MediaError:
                        continue
            except AvsaError as e:
                if not self.data.skip_missing_shards:
                    raise
                log.warning("labels of %s left out: %s", uri, e)
        rows = [r for r in rows if r is not None]
        return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, len(self.class_names)),
                                                                    np.float32))

    def train(self, epoch: int) -> Iterator[dict[str, Any]]:
        return self._iter(self.train_uri, self.data, epoch=epoch, seed=self.seed, shuffle=True)

    def test(self, pass_index: int = 0) -> Iterator[dict[str, Any]]:
        data = dataclasses.replace(self.data, augment=False)
        return self._iter(self.test_uri, data, epoch=pass_index,
                          seed=self.seed + TEST_SEED_OFFSET, shuffle=False)
