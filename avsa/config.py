"""Typed configuration: one dataclass per Hydra group, composed from `configs/` and validated once.

`compose(["data.num_viewpoints=8", ...])` returns a validated `Config`; every problem is a
`ConfigError` naming the key and the allowed range, raised before Ray or MLflow is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avsa.config_checks import check_known_keys, close_key, validate
from avsa.errors import ConfigError

# Per-viewpoint audio inputs and their channel counts (see avsa.data.transform.audio_features):
# the paper's log-mel of the rotated W, Y, Z, X; log-mel of six virtual cardioids toward
# +-X, +-Y, +-Z; log-mel of W, Y, Z, X plus the active intensity vector per mel band.
AUDIO_FEATURES = {"logmel": 4, "cardioid": 6, "intensity": 7}


def bounded(default: Any, interval: str) -> Any:
    """A field whose value must lie in `interval`, written as in the error message: "[1, 64]",
    "(0, 180)"; a bound may name another field of the same group ("[1, n_fft]")."""
    return field(default=default, metadata={"interval": interval})


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A field whose value must be one of `choices`."""
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class DataConfig:
    shards: str = "outputs/demo/shards/train"
    val_shards: str | None = None
    num_viewpoints: int = bounded(4, "[1, 64]")
    fps: float = bounded(16.0, "(0, 240]")
    frames: int = bounded(8, "[1, 256]")
    audio_seconds: float = bounded(1.0, "(0, 60]")
    sample_rate: int = bounded(24000, "[8000, 192000]")
    crop_size: int = bounded(112, "[8, 1024]")
    n_fft: int = 512
    hop: int = bounded(240, "[1, n_fft]")
    n_mels: int = bounded(128, "[8, 512]")
    el_min_deg: float = bounded(-30.6, "[-90, 90]")
    el_max_deg: float = bounded(30.6, "[el_min_deg, 90]")
    fov_min_deg: float = bounded(25.0, "[1, 179]")
    fov_max_deg: float = bounded(76.0, "[fov_min_deg, 179]")
    aspect_min: float = bounded(0.75, "[0.1, 10]")
    aspect_max: float = bounded(1.3333, "[aspect_min, 10]")
    min_separation_deg: float = bounded(0.0, "[0, 180]")
    audio_mode: str = one_of("foa", ("foa", "mono"))
    audio_features: str = one_of("logmel", tuple(AUDIO_FEATURES))
    augment: bool = True
    volume_jitter: float = bounded(0.1, "[0, 1)")
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.2])
    flip_prob: float = bounded(0.5, "[0, 1]")
    equirect_height: int = bounded(0, "[0, 8192]")
    shuffle_buffer: int = bounded(16, "[0, 1e6]")
    skip_missing_shards: bool = False
    decode_cpus: float = bounded(1.0, "(0, 64]")
    decode_threads: int = bounded(1, "[0, 64]")  # per decode task; 0: FFmpeg's choice
    decode_tasks: int = bounded(0, "[0, 1e6]")  # at once (0: the CPUs Ray Train leaves)
    read_ahead_batches: int = bounded(4, "[1, 1e4]")  # global batches decoded ahead
    # samples reach training in the seeded shard order, however the decode tasks finish:
    # a run repeats exactly; false lets a fast shard overtake a slow one
    preserve_order: bool = True
    seed: int = 0


@dataclass
class ModelConfig:
    """What `avsa.models.build_model` builds; presets: configs/model/*.yaml (`model=tiny`)."""

    name: str = "full"  # the preset these values came from: a label in MLflow and reports
    video_width: int = bounded(64, "[1, 1024]")
    audio_width: int = bounded(64, "[1, 1024]")
    audio_pool: str = one_of("max", ("max", "mean"))
    embed_dim: int = bounded(128, "[1, 8192]")
    transformer_depth: int = bounded(2, "[0, 64]")
    transformer_heads: int = bounded(1, "[1, 64]")
    transformer_dropout: float = bounded(0.1, "[0, 1)")
    spherical_pos_enc: bool = False
    use_transformer: bool = True
    init_from: str | None = None


@dataclass
class LossConfig:
    kind: str = one_of("avsa", ("avsa", "avc", "avts"))
    temperature: float = bounded(0.07, "(0, 10]")
    easy_negatives: str = one_of("same_view", ("same_view", "all_views"))


@dataclass
class TrainConfig:
    max_steps: int = bounded(1000, "[1, 1e9]")
    batch_size: int = bounded(28, "[1, 1e6]")
    num_workers: int = bounded(1, "[1, 4096]")
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, "[0, 256]")
    lr: float = bounded(1e-4, "(0, 1]")
    weight_decay: float = bounded(1e-5, "[0, 1]")
    bf16: bool = True
    compile: bool = False
    curriculum: bool = False
    curriculum_avc_steps: int = bounded(0, "[0, max_steps]")
    log_every: int = bounded(10, "[1, 1e9]")
    checkpoint_every: int = bounded(100, "[1, 1e9]")
    val_every: int = bounded(0, "[0, 1e9]")
    val_batches: int = bounded(4, "[0, 1e6]")
    max_failures: int = bounded(3, "[-1, 1000]")
    seed: int = 0


@dataclass
class StorageConfig:
    path: str = "outputs/runs"
    run_name: str | None = None
    lease_wait_s: float = bounded(0.0, "[0, 604800]")  # for another run's lease (0: refuse)


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "avsa-pretrain"
    log_model: bool = True  # the final network as an MLflow model on the pretraining run
    model_name: str = "avsa-encoders"  # registered model for pretraining (and a sweep's best)
    system_metrics: bool = True  # CPU/GPU/memory/disk/network as system/* metrics
    system_metrics_interval_s: float = bounded(10.0, "[1, 3600]")


@dataclass
class SweepConfig:
    name: str = "viewpoints_temperature"
    space: dict[str, Any] = field(default_factory=dict)
    search: str = one_of("grid", ("grid", "random", "optuna"))
    num_samples: int = bounded(1, "[1, 1e5]")
    metric: str = "val/avsa_score"
    mode: str = one_of("max", ("max", "min"))
    scheduler: str = one_of("asha", ("asha", "fifo"))
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int = bounded(0, "[0, 1e4]")
    report_every: int = 0


SCRATCH = "scratch"  # downstream.pretrain of a randomly initialised network


@dataclass
class DownstreamConfig:
    task: str = one_of("avc_bin", ("avc_bin", "avsa_bin", "action", "segmentation"))
    pretrain: str = SCRATCH
    mode: str = one_of("frozen", ("frozen", "finetune", "linear"))
    # frozen heads: the most epochs (early stopping ends sooner); action finetune: exactly this
    epochs: int = bounded(100, "[1, 1e4]")
    lr: float | None = bounded(None, "(0, 1]")  # None: the head's own (TransferHead.default_lr)
    batch_size: int = bounded(16, "[1, 1e5]")
    max_steps: int = 0
    eval_clips: int = 5
    fold: int = bounded(1, "[1, 3]")
    context: str = one_of("video", ("video", "audio", "context"))
    experiment: str = "avsa-transfer"
    # frozen heads: fraction of training clips held out for early stopping (0: none)
    val_fraction: float = bounded(0.2, "[0, 0.9]")
    patience: int = bounded(10, "[0, 1e4]")  # epochs without a better held-out loss (0: never)
    feature_passes: int = bounded(1, "[1, 1000]")  # augmented passes encoded for the cache
    seed: int | None = bounded(None, "[0, 2147483647]")  # head, shuffling, windows; None: data.seed
    seg_class_weights: str = one_of("median", ("median", "inverse", "none"))
    row: str | None = None  # the row label in `avsa compare` (default: the pretext)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    experiment_name: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        """Deterministic run name: the same config resubmitted finds (and resumes) its run."""
        if self.storage.run_name:
            return self.storage.run_name
        return f"{self.loss.kind}-v{self.data.num_viewpoints}-{config_digest(self)[:10]}"


# Groups that never change what a run computes: where it is stored and tracked, and transfer.
_NOT_IN_DIGEST = ("storage", "tracking", "downstream")
# What a transfer reads of its command's config (the pretraining's own comes with its reference).
_TRANSFER_GROUPS = ("data", "model", "downstream")


def config_digest(cfg: Config, *, sweep: bool = False, transfer: bool = False) -> str:
    """16 hex digits of sha256 over what shapes a run's checkpoints (all but storage, tracking
    and downstream); with `sweep`, a sweep's identity: its settings but max_concurrent_trials;
    with `transfer`, a transfer's: data, model and downstream."""
    d = cfg.to_dict()
    if transfer:
        d = {k: d[k] for k in _TRANSFER_GROUPS}
    else:
        d = {k: v for k, v in d.items() if k not in _NOT_IN_DIGEST}
        if sweep:
            d["sweep"].pop("max_concurrent_trials")
        else:
            d.pop("sweep")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def audio_channels(data: DataConfig) -> int:
    """Channels of the per-viewpoint audio input: 1 for a mono beam, else those of
    data.audio_features."""
    return 1 if data.audio_mode == "mono" else AUDIO_FEATURES[data.audio_features]


def config_dir() -> Path:
    """The `configs/` tree: `$AVSA_CONFIG_DIR`, else the one beside the package."""
    env = os.environ.get("AVSA_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "configs", Path.cwd() / "configs"]
    for c in candidates:
        if (c / "pretrain.yaml").is_file():
            return c
    raise ConfigError("configs", f"no config tree found (looked in {', '.join(map(str, candidates))})")


def as_literal(value: Any) -> Any:
    """`value` (a str, or dicts and lists of them) as OmegaConf values that resolve to
    themselves: `${` escaped, so a path holding it is no interpolation."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: as_literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_literal(v) for v in value]
    return value


def override(key: str, value: object) -> str:
    """The override `key='value'` that sets `key` to str(value) exactly, whatever it holds
    (`=`, `,`, brackets, quotes, `${`, backslashes), e.g. for a path in compose()."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", as_literal(str(value)))
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"{key}='{text}'"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose `configs/pretrain.yaml` with Hydra overrides into a validated `Config`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if flags := [o for o in overrides if o.startswith("-")]:
        raise ConfigError(flags[0], "not an override: give KEY=VALUE overrides (e.g. "
                                    "train.max_steps=500); --help shows the command's usage")
    ConfigStore.instance().store(name="avsa_schema", node=Config)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="pretrain", overrides=list(overrides))
        check_known_keys(cfg, Config)
        obj = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:  # bad values, overrides, groups
        # Hydra wraps OmegaConf's errors: the wrapped one names the key.
        err = e.__cause__ if isinstance(e, HydraException) else e
        if not (isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None)):
            err = e
        key, reason = getattr(err, "full_key", None) or "override", _first_line(err)
        if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and (
                near := close_key(key, Config)):
            reason += f"; did you mean {near}?"
        if key.startswith("sweep.space.") and reason.startswith("Cannot merge"):
            reason += (f"; to turn a list into a distribution or back, drop the key first: "
                       f"'~{key}' '+{key}=...'")
        raise ConfigError(key, reason) from None
    finally:
        GlobalHydra.instance().clear()
    validate(obj)
    return obj


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a `Config` from `Config.to_dict()` output (e.g. a checkpoint's resolved config):
    every value as it is, `${` in a path included."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), as_literal(d)))


def _first_line(e: BaseException) -> str:
    """Hydra and OmegaConf errors span lines; keep the informative ones on one line, with the
    tab-indented list after a heading ("Available options in 'data':") on the heading's."""
    text = str(e).strip().split("\nConfig search path:")[0]
    text = re.sub(r"\n\t", ", ", re.sub(r":\n\t", ": ", text))
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("full_key", "object_type", "reference_type", "Set the"))]
    return " — ".join(lines[:2]) or type(e).__name__


def _absolute(uri: str | None, cwd: Path) -> str | None:
    if not uri or "://" in uri:
        return uri
    return str((cwd / Path(uri).expanduser()).resolve())


def with_absolute_paths(cfg: Config, cwd: str | os.PathLike | None = None) -> Config:
    """A copy of cfg whose local data, storage and checkpoint paths (model.init_from,
    downstream.pretrain) are absolute against cwd (default: the current directory), as Ray Train
    workers run elsewhere and runs record where they read; URIs and run ids pass through."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    out = copy.deepcopy(cfg)
    out.data.shards = _absolute(out.data.shards, base)
    out.data.val_shards = _absolute(out.data.val_shards, base)
    out.storage.path = _absolute(out.storage.path, base)
    for group, key in ((out.model, "init_from"), (out.downstream, "pretrain")):
        ref = getattr(group, key)
        if ref and ref != SCRATCH and "://" not in ref and (base / ref).exists():
            setattr(group, key, _absolute(ref, base))
    return out
