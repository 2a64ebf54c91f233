"""Faults injected into Ray Train runs by the tests, through the run driver's `callbacks`:
nothing of this ships in the package."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import ray.cloudpickle
import ray.train
from ray.train.v2._internal.execution.callback import TrainContextCallback


class LastRankExits(TrainContextCallback):
    """The last rank of the worker group exits hard (`os._exit(1)`) once, right after its
    `after_report`-th `ray.train.report`. `marker`, a local file written first, records that
    it did: the restarted worker group goes on.

    Ray Train copies the callback into every worker process, so each counts its own reports.
    """

    def __init__(self, after_report: int, marker: Path):
        self.after_report, self.marker, self._reports = after_report, str(marker), 0

    @contextlib.contextmanager
    def on_report(self) -> Iterator[None]:
        yield
        self._reports += 1
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        if self._reports != self.after_report or rank != world - 1 or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(json.dumps({"report": self._reports, "rank": rank}))
        os._exit(1)


class CountReports(TrainContextCallback):
    """Rank 0 appends a line to `path` after each of its `ray.train.report` calls."""

    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def on_report(self) -> Iterator[None]:
        yield
        if ray.train.get_context().get_world_rank() == 0:
            with open(self.path, "a") as f:
                f.write("report\n")


# The workers cannot import this module (only the package is on their path): ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
