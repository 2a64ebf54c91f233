"""Class names of the synthetic scenes, and the sidecar json that names a clip's classes: one
source for the generator, shard writing, the sample transform and the transfer tasks. Mask ids
follow the list: CLASSES[i] -> i + 1, 0 = background."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from avsa.errors import MediaError

CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes", "checker", "star")
NUM_CLASSES = len(CLASSES)


def parse_meta(data: bytes, name: str) -> dict[str, Any]:
    """A clip's json sidecar `name` as a dict; MediaError when it is not a JSON object."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MediaError(name, f"invalid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise MediaError(name, "expected a JSON object")
    return meta


def label_vector(meta: dict, name: str) -> np.ndarray | None:
    """(NUM_CLASSES,) float32 multi-hot of meta["classes"] (names, or mask ids 1..K), None when
    it names none; MediaError naming the sidecar `name` for an unknown class."""
    if "classes" not in meta:
        return None
    hot = np.zeros(NUM_CLASSES, dtype=np.float32)
    if not isinstance(meta["classes"], list):
        raise MediaError(name, f"'classes' must be a list, got {meta['classes']!r:.60}")
    for c in meta["classes"]:
        if isinstance(c, str) and c in CLASSES:
            hot[CLASSES.index(c)] = 1.0
        elif isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= NUM_CLASSES:
            hot[c - 1] = 1.0  # numeric ids follow the masks: 1..K, 0 = background
        else:
            raise MediaError(name, f"unknown class {c!r}")
    return hot
