"""Which checkpoint a run resumes from: the newest complete one on storage, not Ray Train's own
list (`checkpoint_manager_snapshot.json`), saved after the fact: after an interrupt it can lag
the directories on storage, and a checkpoint removed or damaged since breaks it.

- rank 0 writes `avsa_committed.json` into `checkpoint-<step>/` once Ray's upload of that
  checkpoint has returned; a checkpoint is complete when its marker is there;
- before a run starts, the driver (holding the run directory's lease) sets a damaged newest
  complete checkpoint aside as `damaged-<name>` (renamed, not deleted; reported once) and tries
  the one before it; Ray's snapshot is moved aside when it names a checkpoint no longer there,
  so Ray starts its bookkeeping afresh instead of refusing the run;
- every worker resumes from the newest complete checkpoint it finds (or Ray's, if newer).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from avsa import storage
from avsa.errors import CheckpointError

log = logging.getLogger("avsa.train")
COMMITTED = "avsa_committed.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def commit(checkpoint_uri: str, step: int) -> None:
    """Mark the checkpoint at `checkpoint_uri` complete (after its upload has returned)."""
    body = {"step": step, "committed": time.time()}
    storage.write_bytes(storage.join(checkpoint_uri, COMMITTED), json.dumps(body).encode())


def _children(run_uri: str) -> dict[str, set[str]]:
    """Immediate sub-directories of `run_uri` -> the relative paths of the files inside."""
    out: dict[str, set[str]] = {}
    for uri in storage.list_prefix(run_uri):
        head, _, tail = storage.relative(uri, run_uri).partition("/")
        if tail:
            out.setdefault(head, set()).add(tail)
    return out


def checkpoints(run_uri: str, *, complete: bool = True) -> list[tuple[int, str]]:
    """(step, URI) of the `checkpoint-<step>/` directories directly under `run_uri`, newest
    first; with `complete`, only those holding their commit marker. Set-aside
    `damaged-checkpoint-*` directories are never among them."""
    found = []
    for name, files in _children(run_uri).items():
        m = _NAME.match(name)
        if m and (COMMITTED in files or not complete):
            found.append((int(m.group(1)), storage.join(run_uri, name)))
    return sorted(found, reverse=True)


def newest_loadable(run_uri: str, *, set_aside: bool) -> tuple[int, str, dict[str, Any]] | None:
    """(step, URI, state) of the newest complete checkpoint that loads. Damaged ones are
    reported, and with `set_aside` renamed to `damaged-<name>`."""
    from avsa.train.checkpoint import load

    for step, uri in checkpoints(run_uri):
        try:
            return step, uri, load(uri)
        except CheckpointError as e:
            if not set_aside:
                log.warning("skipping a damaged checkpoint: %s", e)
                continue
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            aside = storage.join(run_uri, f"damaged-{name}")
            log.warning("damaged checkpoint %s: %s; moved aside to %s, resuming from the one "
                        "before it", name, e.reason, aside)
            storage.move_tree(uri, aside)
    return None


def _snapshot_names(run_uri: str) -> set[str] | None:
    uri = storage.join(run_uri, RAY_SNAPSHOT)
    if not storage.exists(uri):
        return None
    try:
        snap = json.loads(storage.read_bytes(uri))
        return {r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {"<unreadable>"}


def prepare(run_uri: str) -> tuple[int, str] | None:
    """Before a (re)start: set damaged checkpoints aside, and Ray's snapshot too when it names
    checkpoints that are gone. Returns (step, URI) of the checkpoint to resume from, if any."""
    found = newest_loadable(run_uri, set_aside=True)
    names = _snapshot_names(run_uri)
    if names is not None and not names <= set(_children(run_uri)):
        snap = storage.join(run_uri, RAY_SNAPSHOT)
        aside = storage.join(run_uri, f"stale-{int(time.time())}-{RAY_SNAPSHOT}")
        storage.write_bytes(aside, storage.read_bytes(snap))
        storage.delete(snap)
        log.info("Ray's checkpoint list names checkpoints no longer there; kept as %s", aside)
    return None if found is None else found[:2]
