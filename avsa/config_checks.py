"""Checks on a config, before Ray starts: every value in its allowed range (`validate`), keys
that are not in the schema however they were written (`+key=`, `++key=`), a run name that must
stay one safe path segment, and combinations of keys that cannot work together.

Each check raises `ConfigError` naming the key(s), in one line; `temperature_warning` returns
a warning line instead (the run can go on, but will not learn much).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from avsa.errors import ConfigError

# Keys whose value is an open mapping: adding keys there is the point (a sweep's search space).
OPEN_KEYS = ("sweep.space",)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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

    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    out = []
    for key in node.keys() if isinstance(node, DictConfig) else ():
        path = f"{prefix}{key}"
        if key not in fields:
            out.append(path)
            continue
        if path in OPEN_KEYS:
            continue
        child_type = hints.get(str(key))
        if dataclasses.is_dataclass(child_type):
            out.extend(unknown_keys(node._get_node(key), child_type, f"{path}."))
    return out


def check_known_keys(node: Any, schema: type) -> None:
    """Refuse keys the schema does not have (a typo added with `+` or `++` would else be
    ignored without a word)."""
    bad = unknown_keys(node, schema)
    if bad:
        parent = bad[0].rpartition(".")[0]
        where = f"{parent!r}" if parent else "the config"
        raise ConfigError(bad[0], f"no such key in {where} (a typo? `+`/`++` add keys only "
                                  f"under sweep.space)")


def check_run_name(name: str | None) -> None:
    if name is None:
        return
    if not RUN_NAME.match(name):
        raise ConfigError("storage.run_name", f"must be one path segment of ASCII letters, "
                                              f"digits, '.', '_' or '-' (at most 128, starting "
                                              f"with a letter or digit), got {name!r}")


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


def check_audio_window(data: Any) -> None:
    window = round(data.audio_seconds * data.sample_rate)
    if not 16 <= data.n_fft <= min(window, MAX_N_FFT):
        raise ConfigError(
            "data.n_fft", f"must be in [16, {min(window, MAX_N_FFT)}] (the audio window "
                          f"data.audio_seconds x data.sample_rate = {window} samples, at most "
                          f"{MAX_N_FFT}), got {data.n_fft}")


def check_seeds(cfg: Any) -> None:
    for key, value in (("data.seed", cfg.data.seed), ("train.seed", cfg.train.seed)):
        if not 0 <= value < 2**32:
            raise ConfigError(key, f"must be in [0, 2**32), got {value}")


def check_combinations(cfg: Any) -> None:
    """The cross-field checks that need no data: run name, seeds, audio window, viewpoints."""
    check_run_name(cfg.storage.run_name)
    check_seeds(cfg)
    check_audio_window(cfg.data)
    check_viewpoints_fit(cfg.data)


def check_batch_fits_data(cfg: Any, total_samples: int) -> None:
    """One step needs `train.batch_size` samples: a larger batch than the data would end the
    run before its first step."""
    if cfg.train.batch_size > total_samples:
        raise ConfigError("train.batch_size", f"must be at most the {total_samples} samples in "
                                              f"data.shards, got {cfg.train.batch_size}")


def temperature_warning(temperature: float) -> str | None:
    """A warning line when logits (cosine / temperature) grow so large the softmax saturates."""
    largest = 1.0 / temperature
    if largest <= MAX_LOGIT:
        return None
    return (f"loss.temperature={temperature:g}: logits reach {largest:.3g}, far beyond "
            f"{MAX_LOGIT:g}, so the softmax saturates (float32 exp overflows at 88): the loss "
            f"will be huge and its gradients mostly zero; the paper uses 0.07")


def _check(ok: bool, key: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(key, f"must be {allowed}, got {value!r}")


def _in_range(key: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False):
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
    _check(ok, key, f"in {lb}{lo:g}, {hi:g}{rb}", value)


def _check_tracking(tr: Any) -> None:
    _check(bool(re.fullmatch(r"[\w.-]+", tr.model_name or "")), "tracking.model_name",
           "a registered model name (letters, digits, '_', '.', '-')", tr.model_name)
    _in_range("tracking.system_metrics_interval_s", tr.system_metrics_interval_s, 1, 3600)


def validate(cfg: Any) -> Any:
    """Check every user-settable value of a `avsa.config.Config`, then the combinations;
    raise `ConfigError('key', 'must be ..., got ...')`."""
    from avsa.config import (
        AUDIO_FEATURES,
        AUDIO_MODES,
        DOWNSTREAM_MODES,
        EASY_NEGATIVES,
        LOSS_KINDS,
        SCHEDULERS,
        SEARCHES,
        TASKS,
    )

    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    _check(bool(d.shards), "data.shards", "a manifest or shard-folder URI", d.shards)
    _in_range("data.num_viewpoints", d.num_viewpoints, 1, 64)
    _in_range("data.fps", d.fps, 0, 240, lo_open=True)
    _in_range("data.frames", d.frames, 1, 256)
    _in_range("data.audio_seconds", d.audio_seconds, 0, 60, lo_open=True)
    _check(d.frames / d.fps <= d.audio_seconds + 1e-9, "data.frames",
           f"a video window (frames / fps) within data.audio_seconds={d.audio_seconds}", d.frames)
    _in_range("data.sample_rate", d.sample_rate, 8000, 192000)
    _in_range("data.crop_size", d.crop_size, 8, 1024)
    _in_range("data.n_mels", d.n_mels, 8, 512)
    _in_range("data.hop", d.hop, 1, d.n_fft)
    _in_range("data.el_min_deg", d.el_min_deg, -90, 90)
    _in_range("data.el_max_deg", d.el_max_deg, d.el_min_deg, 90)
    _in_range("data.fov_min_deg", d.fov_min_deg, 0, 180, lo_open=True, hi_open=True)
    _in_range("data.fov_max_deg", d.fov_max_deg, d.fov_min_deg, 180, hi_open=True)
    _in_range("data.aspect_min", d.aspect_min, 0, 10, lo_open=True)
    _in_range("data.aspect_max", d.aspect_max, d.aspect_min, 10)
    _in_range("data.min_separation_deg", d.min_separation_deg, 0, 180)
    _check(d.audio_mode in AUDIO_MODES, "data.audio_mode", f"one of {AUDIO_MODES}", d.audio_mode)
    _check(d.audio_features in AUDIO_FEATURES, "data.audio_features",
           f"one of {tuple(AUDIO_FEATURES)}", d.audio_features)
    _check(d.audio_mode == "foa" or d.audio_features == "logmel", "data.audio_features",
           "logmel with data.audio_mode=mono (a single beam has no direction to keep)",
           d.audio_features)
    _in_range("data.volume_jitter", d.volume_jitter, 0, 1, hi_open=True)
    _check(len(d.color_jitter) == 4 and all(v >= 0 for v in d.color_jitter), "data.color_jitter",
           "4 non-negative numbers [brightness, contrast, saturation, hue]", d.color_jitter)
    _in_range("data.flip_prob", d.flip_prob, 0, 1)
    _in_range("data.equirect_height", d.equirect_height, 0, 8192)
    _in_range("data.shuffle_buffer", d.shuffle_buffer, 0, 1_000_000)
    _in_range("data.decode_cpus", d.decode_cpus, 0, 64, lo_open=True)
    _in_range("data.decode_threads", d.decode_threads, 0, 64)
    _in_range("data.decode_tasks", d.decode_tasks, 0, 1_000_000)
    _in_range("data.read_ahead_batches", d.read_ahead_batches, 1, 10_000)

    _in_range("model.video_width", m.video_width, 1, 1024)
    _in_range("model.audio_width", m.audio_width, 1, 1024)
    _in_range("model.embed_dim", m.embed_dim, 1, 8192)
    _in_range("model.transformer_depth", m.transformer_depth, 0, 64)
    _in_range("model.transformer_heads", m.transformer_heads, 1, 64)
    _in_range("model.transformer_dropout", m.transformer_dropout, 0, 1, hi_open=True)
    for key, width in (("model.video_width", m.video_width), ("model.audio_width", m.audio_width)):
        _check(8 * width % m.transformer_heads == 0, "model.transformer_heads",
               f"a divisor of the feature width 8*{key.split('.')[1]}={8 * width}",
               m.transformer_heads)

    _check(lo.kind in LOSS_KINDS, "loss.kind", f"one of {LOSS_KINDS}", lo.kind)
    _in_range("loss.temperature", lo.temperature, 0, 10, lo_open=True)
    _check(lo.easy_negatives in EASY_NEGATIVES, "loss.easy_negatives", f"one of {EASY_NEGATIVES}",
           lo.easy_negatives)

    _in_range("train.max_steps", t.max_steps, 1, 10**9)
    _in_range("train.batch_size", t.batch_size, 1, 1_000_000)
    _in_range("train.num_workers", t.num_workers, 1, 4096)
    _check(t.batch_size % t.num_workers == 0, "train.batch_size",
           f"a multiple of train.num_workers={t.num_workers} (it is the global batch)",
           t.batch_size)
    _in_range("train.cpus_per_worker", t.cpus_per_worker, 0, 256)
    _in_range("train.lr", t.lr, 0, 1, lo_open=True)
    _in_range("train.weight_decay", t.weight_decay, 0, 1)
    _in_range("train.log_every", t.log_every, 1, 10**9)
    _in_range("train.checkpoint_every", t.checkpoint_every, 1, 10**9)
    _in_range("train.val_every", t.val_every, 0, 10**9)
    _in_range("train.val_batches", t.val_batches, 0, 10**6)
    _in_range("train.max_failures", t.max_failures, -1, 1000)
    _in_range("train.curriculum_avc_steps", t.curriculum_avc_steps, 0, t.max_steps)
    _check(not t.curriculum or t.curriculum_avc_steps > 0, "train.curriculum_avc_steps",
           "> 0 when train.curriculum=true", t.curriculum_avc_steps)

    _check(bool(cfg.storage.path), "storage.path", "a local path or s3:// URI", cfg.storage.path)
    _in_range("storage.lease_wait_s", cfg.storage.lease_wait_s, 0, 7 * 86400)
    _check(bool(cfg.tracking.experiment), "tracking.experiment", "a non-empty name",
           cfg.tracking.experiment)
    _check_tracking(cfg.tracking)

    s = cfg.sweep
    _check(s.search in SEARCHES, "sweep.search", f"one of {SEARCHES}", s.search)
    _check(s.scheduler in SCHEDULERS, "sweep.scheduler", f"one of {SCHEDULERS}", s.scheduler)
    _check(s.mode in ("max", "min"), "sweep.mode", "'max' or 'min'", s.mode)
    _in_range("sweep.num_samples", s.num_samples, 1, 100_000)
    _in_range("sweep.max_concurrent_trials", s.max_concurrent_trials, 0, 10_000)

    ds = cfg.downstream
    _check(ds.task in TASKS, "downstream.task", f"one of {TASKS}", ds.task)
    _check(ds.mode in DOWNSTREAM_MODES, "downstream.mode", f"one of {DOWNSTREAM_MODES}", ds.mode)
    _check(ds.context in ("video", "audio", "context"), "downstream.context",
           "one of ('video', 'audio', 'context')", ds.context)
    _in_range("downstream.epochs", ds.epochs, 1, 10_000)
    _in_range("downstream.lr", ds.lr, 0, 1, lo_open=True)
    _in_range("downstream.batch_size", ds.batch_size, 1, 100_000)
    _in_range("downstream.fold", ds.fold, 1, 3)
    _in_range("downstream.val_fraction", ds.val_fraction, 0, 0.9)
    _in_range("downstream.patience", ds.patience, 0, 10_000)
    _in_range("downstream.feature_passes", ds.feature_passes, 1, 1000)
    if ds.seed is not None:
        _in_range("downstream.seed", ds.seed, 0, 2**31 - 1)
    _check(ds.seg_class_weights in ("median", "inverse", "none"), "downstream.seg_class_weights",
           "one of ('median', 'inverse', 'none')", ds.seg_class_weights)
    check_combinations(cfg)
    return cfg
