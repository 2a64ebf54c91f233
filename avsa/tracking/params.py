"""Configs as MLflow params: nested values flattened to dotted keys, secrets left out."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from avsa.tracking.client import redact

# MLflow's limits (mlflow.utils.validation).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
_SECRET_MARKERS = ("secret", "password", "token", "key_id", "access_key")


def _leaf_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_leaf_text(v) for v in value) + "]"
    return redact(str(value))


def _children(obj: Any) -> Iterable[tuple[str, Any]] | None:
    """(name, value) pairs of a structured value; None for a leaf."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        try:
            obj = OmegaConf.to_container(obj, resolve=True)
        except Exception:
            obj = OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)) and any(_children(v) is not None for v in obj):
        return [(str(i), v) for i, v in enumerate(obj)]
    return None


def flatten_config(obj: Any) -> dict[str, str]:
    """Nested dataclasses / dicts / OmegaConf configs as MLflow params: dotted keys
    (``data.num_viewpoints``), string values cut to 6000 chars, lists of scalars one value
    (``[0.4, 0.4]``). A key whose name holds secret/password/token/key_id/access_key (any case)
    is dropped with its whole subtree; ``user:password@`` in URI values is masked."""
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        children = _children(value)
        if children is None:
            out[(path or "value")[:MAX_KEY]] = _leaf_text(value)[:MAX_PARAM_VALUE]
            return
        for name, child in children:
            if not any(marker in name.lower() for marker in _SECRET_MARKERS):
                walk(child, f"{path}.{name}" if path else name)

    walk(obj, "")
    return out
