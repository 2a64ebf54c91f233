"""Transfer statistics on arrays: IoU from confusion matrices and bootstrap confidence intervals.

Pure numpy, no I/O: the task modules score with these, and `avsa compare` resamples the
per-example results that each transfer run stores (see avsa.downstream.run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# statistic(sums, counts) -> (B,): sums (B, ...) of resampled rows, counts (B,) rows drawn.
Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]
LEVEL = 0.95  # the coverage of bootstrap_ci's intervals


def mean_statistic(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The mean of the resampled rows: per-example scores (hits 0/1, losses, ...)."""
    return sums.reshape(len(sums), -1)[:, 0] / counts


def confusions(target: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """(N, C, C) int64 confusion matrices (rows the truth, columns the prediction) of N groups
    of class indices in [0, C): target, pred (N, ...), e.g. the pixels of N crops."""
    n = len(target)
    cell = np.arange(n).reshape(n, 1) * classes + target.reshape(n, -1).astype(np.int64)
    cell = cell * classes + pred.reshape(n, -1).astype(np.int64)
    return np.bincount(cell.ravel(), minlength=n * classes * classes).reshape(n, classes, classes)


def iou(conf: np.ndarray, *, foreground: bool = False) -> np.ndarray:
    """Mean IoU of confusion matrices (..., C, C) (rows ground truth, columns prediction).

    The mean runs over the classes present in the ground truth or the prediction (union > 0);
    with `foreground`, class 0 (background) is left out too. nan where no class qualifies.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    present = union > 0
    if foreground:
        present[..., 0] = False
    ratio = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    n = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, ratio.sum(-1) / n, np.nan)


def pixel_accuracy(conf: np.ndarray) -> np.ndarray:
    """Correct / all pixels of confusion matrices (..., C, C); nan where there is no pixel."""
    conf = np.asarray(conf, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diagonal(conf, axis1=-2, axis2=-1).sum(-1) / conf.sum(axis=(-2, -1))


def of_sums(metric: Callable[..., np.ndarray], **kw) -> Statistic:
    """The statistic metric(sums, **kw) of the summed rows, e.g. the mIoU of the resampled
    crops' summed confusion matrices: of_sums(iou, foreground=True)."""
    return lambda sums, counts: metric(sums, **kw)


def bootstrap_ci(
    values: np.ndarray | Sequence[np.ndarray],
    *,
    n: int = 2000,
    seed: int = 0,
    statistic: Statistic = mean_statistic,
    clusters: Sequence[np.ndarray | None] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi), covering LEVEL, of `statistic` over rows.

    values: one array (N, ...) of per-example results (a hit vector, per-crop confusion
    matrices), or a sequence of such arrays, one per run (seed) of the same cell. With several
    runs the resampling has two levels: draw runs with replacement, then examples with
    replacement within each drawn run, so the interval carries the spread between seeds as
    well as the finite test set. clusters: per array, (N,) ids of the unit each row belongs to
    (the clip of a viewpoint, the video of a window) or None; rows sharing an id are drawn
    together, since they are not independent examples. `n` resamples from `seed`.
    """
    arrays = [np.asarray(values)] if isinstance(values, np.ndarray) else [
        np.asarray(v) for v in values]
    ids = list(clusters) if clusters is not None else [None] * len(arrays)
    if len(ids) != len(arrays):
        raise ValueError(f"{len(ids)} cluster arrays for {len(arrays)} value arrays")
    units = [_units(a, c) for a, c in zip(arrays, ids) if len(a)]
    if not units:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # how often each run is drawn in each resample (always 1 with a single run)
    picks = rng.multinomial(len(units), np.full(len(units), 1 / len(units)), size=n)
    sums = np.zeros((n, units[0][0].shape[1]))
    counts = np.zeros(n)
    for r, (x, size) in enumerate(units):
        m = len(x)
        # m-unit draws, picks[:, r] times over: one multinomial with m * picks trials
        weights = rng.multinomial(m * picks[:, r], np.full(m, 1 / m))  # (n, m)
        sums += weights @ x
        counts += weights @ size
    shape = next(a for a in arrays if len(a)).shape[1:]
    stats = statistic(sums.reshape(n, *shape), counts)
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    tail = (1 - LEVEL) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)


def _units(values: np.ndarray, cluster: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The resampled units of one run: row sums (U, D) float64 and rows per unit (U,)."""
    rows = values.reshape(len(values), -1).astype(np.float64)
    if cluster is None:
        return rows, np.ones(len(rows))
    cluster = np.asarray(cluster).reshape(-1)
    if len(cluster) != len(rows):
        raise ValueError(f"{len(cluster)} cluster ids for {len(rows)} rows")
    _, unit = np.unique(cluster, return_inverse=True)
    sums = np.zeros((unit.max() + 1, rows.shape[1]))
    np.add.at(sums, unit, rows)
    return sums, np.bincount(unit).astype(np.float64)
