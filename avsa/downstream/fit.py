"""One training loop for every transfer head (`fit_head`), with early stopping on held-out
clips (`holdout`), the cache of frozen encodings it trains on (`Cached`) and what a task adds
to it (`TransferHead`).

Frozen tasks encode each split once (`encode_passes`) and train their heads on the cached
rows, as linear-probe practice does. Held-out clips are chosen by their keys' hashes, so the
choice does not depend on order, pass or seed, and every augmented pass of a held-out clip
stays out of training.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from avsa.config import DataConfig, DownstreamConfig
from avsa.downstream.sources import ShardSource
from avsa.errors import ShardError

# log(metrics, step): per-epoch training metrics go to the tracking run through this.
EpochLog = Callable[[dict[str, float], int], None]


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm keeps its statistics, dropout off) and no gradients."""
    return module.eval().requires_grad_(False)


@dataclass
class Cached:
    """Encoded examples: tensors (N, ...) and the clip key of each of the N rows."""

    tensors: dict[str, torch.Tensor]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at `index` (int64 indices or a bool mask) of every tensor."""
        return {k: v[index.to(v.device)] for k, v in self.tensors.items()}

    def subset(self, mask: torch.Tensor) -> Cached:
        keep = mask.nonzero().squeeze(1)
        return Cached(self.take(keep), [self.keys[int(i)] for i in keep])


@torch.no_grad()
def encode_passes(
    batches: Callable[[int], Iterable[dict]],
    passes: int,
    encode: Callable[[dict], dict[str, torch.Tensor]],
) -> Cached | None:
    """Encode every batch of `batches(p)` for p < passes once; None when no batch came.

    encode(batch) returns tensors whose rows are the batch's clips (B rows) or its
    clips' viewpoints (B V rows, clip-major); each row gets its clip's key (batch["key"]).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    keys: list[str] = []
    for p in range(passes):
        for batch in batches(p):
            out = encode(batch)
            for name, t in out.items():
                parts.setdefault(name, []).append(t)
            rows = len(next(iter(out.values())))
            keys += [k for k in batch["key"] for _ in range(rows // len(batch["key"]))]
    if not keys:
        return None
    return Cached({k: torch.cat(v) for k, v in parts.items()}, keys)


@dataclass
class FitResult:
    epochs: int  # epochs run
    steps: int  # optimiser steps taken
    best_epoch: int  # the epoch whose weights the module holds (the last without validation)
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    val_loss: list[float] = field(default_factory=list)  # per epoch, empty without validation


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch over n rows: index tensors of batch_size; the last may be shorter, but
    a lone last row joins the batch before it (a BatchNorm head cannot train on one row)."""
    parts = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def fit_head(
    module: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor | None],
    batches: Callable[[int], Iterable[Any]],
    *,
    epochs: int,
    lr: float,
    validate: Callable[[], float] | None = None,
    patience: int = 0,
    max_steps: int = 0,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.1,
    log: EpochLog | None = None,
) -> FitResult:
    """Train `module`'s trainable parameters with Adam on `loss_fn(batch)` for each batch of
    `batches(epoch)` (loss_fn returns None to skip a batch).

    The module is in train mode for the steps and in eval mode, without gradients, for
    `validate()`. patience 0 never stops early (the best epoch is still restored); max_steps
    > 0 caps the optimiser steps over all epochs; the learning rate is multiplied by lr_gamma
    after each epoch in lr_milestones. `log` gets train/loss (and val/loss) per epoch.
    """
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(lr_milestones), gamma=lr_gamma)
    result = FitResult(epochs=0, steps=0, best_epoch=-1)
    best, best_state, since_best = math.inf, None, 0
    for epoch in range(epochs):
        module.train()
        losses = []
        for batch in batches(epoch):
            if (loss := loss_fn(batch)) is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            result.steps += 1
            if result.steps == max_steps:
                break
        result.epochs = epoch + 1
        if not losses:
            break
        sched.step()
        metrics = {"train/loss": sum(losses) / len(losses)}
        result.train_loss.append(metrics["train/loss"])
        if validate is None:
            result.best_epoch = epoch
        else:
            module.eval()
            with torch.no_grad():
                metrics["val/loss"] = val = float(validate())
            result.val_loss.append(val)
            since_best += 1
            if val < best:  # nan never improves
                best, best_state, since_best = val, copy.deepcopy(module.state_dict()), 0
                result.best_epoch = epoch
        if log is not None:
            log(metrics, epoch)
        if result.steps == max_steps or (patience and since_best >= patience):
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    return result


def holdout(keys: Sequence[str], fraction: float, *, min_keys: int = 1) -> torch.Tensor:
    """(N,) bool, True for rows whose clip key is held out for validation.

    round(fraction x distinct keys) keys are held out, at least `min_keys` and leaving at least
    `min_keys` for training; the keys with the smallest sha256 are chosen. None is held out
    when fraction is 0 or there are fewer than 2 x min_keys distinct keys.
    """
    distinct = sorted(set(keys), key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    if fraction <= 0 or len(distinct) < 2 * min_keys:
        return torch.zeros(len(keys), dtype=torch.bool)
    count = min(max(min_keys, round(fraction * len(distinct))), len(distinct) - min_keys)
    chosen = set(distinct[:count])
    return torch.tensor([k in chosen for k in keys], dtype=torch.bool)


class TransferHead:
    """One transfer task: what it adds to head training on frozen features.

    The class is the task's entry in the registry (avsa.downstream.run.TASKS): `source` says
    where its clips come from, and the constructor (model, source, ds, device) builds the head
    after the caller seeded torch. The instance sets `name` and `module` (the trainable head,
    on its device) and defines `encode` (a source batch -> cached rows, one per clip or per
    crop), `loss` on a minibatch of rows (None skips it) and `score` on the test split.
    `prepare` sees the encoded training split before training; `fit` is overridden where a task
    trains end to end.
    """

    name: str
    module: nn.Module
    min_rows = 1  # fewer encoded training rows than this is no training split (AVC-Bin: 2)
    min_keys = 1  # clips held out and left for training, at least
    # Adam's rate when downstream.lr is not set. METHOD.md §6's 1e-4 (1e-5 for AVC-Bin) leaves
    # heads on a few hundred cached rows still improving at the 100-epoch cap; at 1e-3 early
    # stopping ends them converged, in a few tens of epochs.
    default_lr = 1e-3

    @classmethod
    def source(cls, data: DataConfig, ds: DownstreamConfig, memo: dict | None):
        """Train and test batches (avsa.downstream.sources): data.shards and data.val_shards."""
        return ShardSource.from_config(data, ds.batch_size, memo=memo)

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
        raise NotImplementedError

    def score(self, source, examples: dict | None) -> dict[str, float]:
        raise NotImplementedError

    def prepare(self, train: Cached, fit: Cached, val: Cached) -> None:
        """train = fit + val, the encoded training rows and their split."""

    def lr(self, ds: DownstreamConfig) -> float:
        return self.default_lr if ds.lr is None else ds.lr

    def val_loss(self, val: Cached) -> float:
        return float(self.loss(val.tensors))

    def fit(self, source, ds: DownstreamConfig, seed: int, log: EpochLog | None) -> FitResult:
        """Encode `ds.feature_passes` passes of `source.train(p)` once and train `module` on
        the cached rows (minibatch order from `seed`), early-stopped on `ds.val_fraction` of
        the training clips."""
        train = encode_passes(source.train, ds.feature_passes, self.encode)
        if train is None or len(train) < self.min_rows:
            need = f" (need >= {self.min_rows})" if self.min_rows > 1 else ""
            raise ShardError(source.train_uri, f"{self.name}: no training clips{need}")
        held = holdout(train.keys, ds.val_fraction, min_keys=self.min_keys)
        fit, val = train.subset(~held), train.subset(held)
        self.prepare(train, fit, val)
        gen = torch.Generator().manual_seed(seed)
        result = fit_head(
            self.module, lambda idx: self.loss(fit.take(idx)),
            lambda epoch: minibatches(len(fit), ds.batch_size, gen),
            epochs=ds.epochs, lr=self.lr(ds), max_steps=ds.max_steps, patience=ds.patience, log=log,
            validate=(lambda: self.val_loss(val)) if len(val) else None)
        if result.steps == 0:
            raise ShardError(source.train_uri, f"{self.name}: no training batch")
        return result
