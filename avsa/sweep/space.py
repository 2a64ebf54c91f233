"""A sweep's search space and names, without Ray or MLflow.

`sweep.space` (`configs/sweep/<name>.yaml`, or `'sweep.space.data.num_viewpoints=[2,4]'`) is a
nested mapping whose leaves are lists (a grid, or choices for random/optuna) or
`{distribution: loguniform|uniform, low, high}`; it becomes Tune's flat `param_space`, every
value validated first. Sweep and trial names are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from avsa.config import Config, as_literal, config_digest
from avsa.config_checks import validate
from avsa.errors import ConfigError
from avsa.sweep.report import VIEWPOINTS_KEY, finite

log = logging.getLogger("avsa.sweep")

DISTRIBUTIONS = ("loguniform", "uniform")
INTERIOR = 0.3819660112501051  # where check_space tries a distribution: never a whole number
SCORE = "val/avsa_score"


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"data": {"num_viewpoints": [2, 4]}}` -> `{"data.num_viewpoints": [2, 4]}`."""
    out: dict[str, Any] = {}
    for name, value in space.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and "distribution" not in value:
            out.update(flatten_space(value, key + "."))
        else:
            out[key] = value
    return out


def tune_space(flat: Mapping[str, Any], search: str) -> dict[str, Any]:
    """Tune's param_space (flat dotted keys): lists become `grid_search` (grid) or `choice`,
    distributions `loguniform`/`uniform`."""
    from ray import tune

    if not flat:
        raise ConfigError("sweep.space", "no keys to search (e.g. 'sweep.space.loss.temperature="
                          "[0.07,0.2]')")
    out: dict[str, Any] = {}
    for key, leaf in flat.items():
        where = f"sweep.space.{key}"
        if isinstance(leaf, Mapping):
            dist, low, high = leaf.get("distribution"), leaf.get("low"), leaf.get("high")
            if search == "grid":
                raise ConfigError(where, "a grid needs a list of values; distributions need "
                                  "sweep.search=random or optuna")
            if dist not in DISTRIBUTIONS:
                raise ConfigError(where, f"distribution must be one of {DISTRIBUTIONS}, got {dist!r}")
            if not (finite(low) and finite(high) and low < high
                    and (dist == "uniform" or low > 0)):
                raise ConfigError(where, f"needs numbers low < high (low > 0 for loguniform), "
                                  f"got low={low!r} high={high!r}")
            out[key] = getattr(tune, dist)(low, high)  # tune.loguniform or tune.uniform
        elif isinstance(leaf, list) and leaf:
            out[key] = (tune.grid_search if search == "grid" else tune.choice)(list(leaf))
        else:
            raise ConfigError(where, "must be a non-empty list of values or {distribution, low, "
                              f"high}}, got {leaf!r}")
    return out


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> Config:
    """The config `base` (a `Config.to_dict()`) with dotted `params` set, validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = OmegaConf.merge(OmegaConf.structured(Config), as_literal(dict(base)))
    for key, value in params.items():
        where = f"sweep.space.{key}"
        current = OmegaConf.select(node, key, default=KeyError)
        if current is KeyError or OmegaConf.is_dict(current):
            raise ConfigError(where, f"{key!r} is not a config value")
        try:
            OmegaConf.update(node, key, as_literal(value), merge=False)
        except OmegaConfBaseException as e:
            reason = " ".join(str(e).split("\n")[0].split())
            raise ConfigError(where, f"cannot take {value!r}: {reason}") from None
    return validate(OmegaConf.to_object(node))


def check_space(cfg: Config, flat: Mapping[str, Any]) -> None:
    """Every key of a space `tune_space` accepted is a config value and every listed value
    passes validation; so do a distribution's bounds and a fractional value between them (an
    integer key takes no distribution)."""
    base = cfg.to_dict()
    for key, leaf in flat.items():
        if not isinstance(leaf, Mapping):
            for value in leaf:
                try:
                    apply_params(base, {key: value})
                except ConfigError as e:  # a check across keys names them, not the space
                    if e.where.startswith("sweep.space."):
                        raise
                    raise ConfigError(e.where, f"{e.reason} (sweep.space.{key}={value!r})") from None
            continue
        low, high = leaf["low"], leaf["high"]
        for value in (low, high):
            apply_params(base, {key: value})
        value = low + INTERIOR * (high - low)
        try:
            apply_params(base, {key: value})
        except ConfigError as e:
            raise ConfigError(f"sweep.space.{key}", f"a {leaf['distribution']} draw such as "
                              f"{value:.4g} fails ({e.reason}); an integer key needs a list of "
                              "values") from None


def scheduler_metric(metric: str, keys: Any) -> str:
    """The metric Tune acts on: raw AVSA accuracy is not comparable across numbers of
    viewpoints (chance is 1/V), so it becomes the chance-normalised score when V varies."""
    if metric == "val/avsa_acc" and VIEWPOINTS_KEY in keys:
        log.warning("data.num_viewpoints varies: scheduling on %s, not %s", SCORE, metric)
        return SCORE
    return metric


# ----------------------------------------------------------------------------- names


def sweep_run_name(cfg: Config) -> str:
    """`storage.run_name` if set, else `<sweep.name>-<digest of the config>`: the same
    command finds the same sweep again."""
    if cfg.storage.run_name:
        return cfg.storage.run_name
    return f"{cfg.sweep.name}-{config_digest(cfg, sweep=True)[:10]}"


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(map(_short, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _round_trips(value: Any) -> bool:
    """Whether `_short(value)` names `value` alone."""
    if isinstance(value, (list, tuple)):
        return all(map(_round_trips, value))
    return not isinstance(value, float) or float(_short(value)) == value


def trial_run_name(sweep_name: str, params: Mapping[str, Any], trial_id: str | None = None) -> str:
    """`<sweep>-num_viewpoints=4_temperature=0.07` (+ `-<trial id>` when values can repeat);
    a list value reads `0.4x0.4`. Where the name would exceed 80 characters, or (without a
    trial id) lose a value's digits or characters, it ends in a hash of the exact values, so
    distinct values keep distinct names."""
    leaves = Counter(k.rsplit(".", 1)[-1] for k in params)
    parts = []
    for key in sorted(params):
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{leaf if leaves[leaf] == 1 else key}={_short(params[key])}")
    joined = "_".join(parts)
    slug = re.sub(r"[^A-Za-z0-9._=-]", "", joined)
    exact = slug == joined and all(map(_round_trips, params.values()))
    if len(slug) > 80 or (trial_id is None and not exact):
        exact_values = json.dumps({k: params[k] for k in sorted(params)}, default=str)
        slug = slug[:60] + "-" + hashlib.sha256(exact_values.encode()).hexdigest()[:8]
    return f"{sweep_name}-{slug}" + (f"-{trial_id}" if trial_id else "")
