"""Checks on a config, before Ray starts: values in range (`validate`), keys not in the schema
(`+key=`, `++key=`), a safe run name, combinations that cannot work. Each raises a one-line
`ConfigError` naming the key(s); the `*_warning` functions return a warning line instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from avsa.errors import ConfigError

# Keys whose value is an open mapping: adding keys there is the point (a sweep's search space).
OPEN_KEYS = ("sweep.space",)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
INTERVAL = re.compile(r"([\[(])(.+), (.+)([\])])")  # "[lo, hi)": a `bounded` field's range
MAX_N_FFT = 65536
# Tries of the viewpoint sampler per check: each must place every viewpoint.
VIEWPOINT_DRAWS = 8
# Logits of the contrastive losses are cosine similarities / temperature: beyond this size the
# softmax is saturated (float32 exp overflows at 88; bf16 has 3 significant digits).
MAX_LOGIT = 100.0


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys in a composed DictConfig `node` that the dataclass `schema` does not have
    (keys below OPEN_KEYS excepted)."""
    from omegaconf import DictConfig

    names = {f.name for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    out = []
    for key in node.keys() if isinstance(node, DictConfig) else ():
        path = f"{prefix}{key}"
        if key not in names:
            out.append(path)
        elif path not in OPEN_KEYS and dataclasses.is_dataclass(hints.get(str(key))):
            out.extend(unknown_keys(node._get_node(key), hints[str(key)], f"{path}."))
    return out


def close_key(key: str, schema: type) -> str | None:
    """The key of `schema` nearest a mistyped dotted `key`, up to its first unknown part:
    "data.num_viewpoint" -> "data.num_viewpoints", "dat.fps" -> "data"; None if none is close."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(schema):
            return None
        names = [f.name for f in dataclasses.fields(schema)]
        if part not in names:
            near = difflib.get_close_matches(part, names, n=1)
            return ".".join([*parts[:i], near[0]]) if near else None
        schema = typing.get_type_hints(schema)[part]
    return None


def check_known_keys(node: Any, schema: type) -> None:
    """Refuse keys the schema does not have (a typo added with `+` or `++` would else be
    ignored without a word)."""
    bad = unknown_keys(node, schema)
    if bad:
        parent = bad[0].rpartition(".")[0]
        where = f"{parent!r}" if parent else "the config"
        near = close_key(bad[0], schema)
        raise ConfigError(bad[0], f"no such key in {where}" + (
            f"; did you mean {near}?" if near else
            " (a typo? `+`/`++` add keys only under sweep.space)"))


def _check(ok: bool, key: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(key, f"must be {allowed}, got {value!r}")


def check_viewpoints_fit(data: Any) -> None:
    """`data.num_viewpoints` centres at `data.min_separation_deg` must fit between
    `data.el_min_deg` and `data.el_max_deg`, every time the sampler draws them."""
    if data.min_separation_deg <= 0 or data.num_viewpoints < 2:
        return
    import torch

    from avsa.geometry import sample_viewpoints

    gen = torch.Generator().manual_seed(0)
    failed = 0
    for _ in range(VIEWPOINT_DRAWS):
        try:
            sample_viewpoints(gen, data.num_viewpoints,
                              el_range_deg=(data.el_min_deg, data.el_max_deg),
                              min_separation_deg=data.min_separation_deg)
        except ConfigError:
            failed += 1
    if failed:
        raise ConfigError(
            "data.num_viewpoints, data.min_separation_deg",
            f"{data.num_viewpoints} viewpoints {data.min_separation_deg:g} deg apart do not fit "
            f"with elevation in [{data.el_min_deg:g}, {data.el_max_deg:g}] deg ({failed} of "
            f"{VIEWPOINT_DRAWS} draws failed); use fewer viewpoints or a smaller separation")


def check_batch_fits_data(cfg: Any, total_samples: int) -> None:
    """One step needs `train.batch_size` samples: a larger batch than the data would end the
    run before its first step."""
    _check(cfg.train.batch_size <= total_samples, "train.batch_size",
           f"at most the {total_samples} samples in data.shards", cfg.train.batch_size)


def short_clips_warning(uri: str, min_seconds: float | None, data: Any) -> str | None:
    """A warning line when the shortest clip of the shard set `uri` (its manifest's
    min_seconds) is shorter than data.audio_seconds: its audio window is padded with silence."""
    if min_seconds is None or min_seconds >= data.audio_seconds - 1e-3:
        return None
    return (f"{uri}: its shortest clip lasts {min_seconds:.2f} s, less than "
            f"data.audio_seconds={data.audio_seconds:g}: the audio of such clips is padded "
            f"with silence")


def temperature_warning(temperature: float) -> str | None:
    """A warning line when logits (cosine / temperature) grow so large the softmax saturates."""
    largest = 1.0 / temperature
    if largest <= MAX_LOGIT:
        return None
    return (f"loss.temperature={temperature:g}: logits reach {largest:.3g}, far beyond "
            f"{MAX_LOGIT:g}, so the softmax saturates (float32 exp overflows at 88): the loss "
            f"will be huge and its gradients mostly zero; the paper uses 0.07")


def check_fields(name: str, group: Any) -> None:
    """The `bounded` and `one_of` fields of the config group `group` (at key `name`); a bound
    that is a name is the value of that field of `group`."""
    for f in dataclasses.fields(group):
        key, value = f"{name}.{f.name}", getattr(group, f.name)
        if "choices" in f.metadata:
            _check(value in f.metadata["choices"], key, f"one of {f.metadata['choices']}", value)
        if "interval" in f.metadata and value is not None:
            lb, lo, hi, rb = INTERVAL.fullmatch(f.metadata["interval"]).groups()
            lo, hi = (float(getattr(group, b) if b.isidentifier() else b) for b in (lo, hi))
            above = value > lo if lb == "(" else value >= lo
            below = value < hi if rb == ")" else value <= hi
            _check(above and below, key, f"in {lb}{lo:g}, {hi:g}{rb}", value)


def validate(cfg: Any) -> Any:
    """Check every user-settable value of a `avsa.config.Config`, then the combinations that
    need no data (run name, seeds, audio window, viewpoints); raise
    `ConfigError('key', 'must be ..., got ...')`."""
    for group in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(node := getattr(cfg, group.name)):
            check_fields(group.name, node)
    d, m, t = cfg.data, cfg.model, cfg.train
    _check(bool(d.shards), "data.shards", "a manifest or shard-folder URI", d.shards)
    _check(d.frames / d.fps <= d.audio_seconds + 1e-9, "data.frames",
           f"a video window (frames / fps) within data.audio_seconds={d.audio_seconds}", d.frames)
    _check(d.audio_mode == "foa" or d.audio_features == "logmel", "data.audio_features",
           "logmel with data.audio_mode=mono (a single beam has no direction to keep)",
           d.audio_features)
    _check(len(d.color_jitter) == 4 and all(v >= 0 for v in d.color_jitter), "data.color_jitter",
           "4 non-negative numbers [brightness, contrast, saturation, hue]", d.color_jitter)
    for name in ("video_width", "audio_width"):
        width = 8 * getattr(m, name)
        _check(width % m.transformer_heads == 0, "model.transformer_heads",
               f"a divisor of the feature width 8*{name}={width}", m.transformer_heads)
    _check(not m.use_transformer or m.transformer_depth >= 1, "model.transformer_depth",
           ">= 1 with model.use_transformer=true (set use_transformer=false for none)",
           m.transformer_depth)
    _check(t.batch_size % t.num_workers == 0, "train.batch_size",
           f"a multiple of train.num_workers={t.num_workers} (it is the global batch)",
           t.batch_size)
    _check(not t.curriculum or t.curriculum_avc_steps > 0, "train.curriculum_avc_steps",
           "> 0 when train.curriculum=true", t.curriculum_avc_steps)
    _check(bool(cfg.storage.path), "storage.path", "a local path or s3:// URI", cfg.storage.path)
    _check(bool(cfg.tracking.experiment), "tracking.experiment", "a non-empty name",
           cfg.tracking.experiment)
    _check(bool(re.fullmatch(r"[\w.-]+", cfg.tracking.model_name or "")), "tracking.model_name",
           "a registered model name (letters, digits, '_', '.', '-')", cfg.tracking.model_name)
    name = cfg.storage.run_name
    _check(name is None or bool(RUN_NAME.fullmatch(name)), "storage.run_name",
           "one path segment of ASCII letters, digits, '.', '_' or '-' (at most 128, starting "
           "with a letter or digit)", name)
    for key, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
        _check(0 <= seed < 2**32, key, "in [0, 2**32)", seed)
    window = round(d.audio_seconds * d.sample_rate)
    _check(16 <= d.n_fft <= min(window, MAX_N_FFT), "data.n_fft",
           f"in [16, {min(window, MAX_N_FFT)}] (the audio window data.audio_seconds x "
           f"data.sample_rate = {window} samples, at most {MAX_N_FFT})", d.n_fft)
    check_viewpoints_fit(d)
    return cfg
