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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avsa.config_checks import check_known_keys, validate
from avsa.errors import ConfigError

CONFIG_DIR_ENV = "AVSA_CONFIG_DIR"
LOSS_KINDS = ("avsa", "avc", "avts")
AUDIO_MODES = ("foa", "mono")
# Per-viewpoint audio inputs and their channel counts (see avsa.data.transform.audio_features):
# the paper's log-mel of the rotated W, Y, Z, X; log-mel of six virtual cardioids toward
# +-X, +-Y, +-Z; log-mel of W, Y, Z, X plus the active intensity vector per mel band.
AUDIO_FEATURES = {"logmel": 4, "cardioid": 6, "intensity": 7}
EASY_NEGATIVES = ("same_view", "all_views")
TASKS = ("avc_bin", "avsa_bin", "action", "segmentation")
DOWNSTREAM_MODES = ("frozen", "finetune", "linear")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "fifo")


@dataclass
class DataConfig:
    shards: str = "outputs/demo/shards/train"
    val_shards: str | None = None
    num_viewpoints: int = 4
    fps: float = 16.0
    frames: int = 8
    audio_seconds: float = 1.0
    sample_rate: int = 24000
    crop_size: int = 112
    n_fft: int = 512
    hop: int = 240
    n_mels: int = 128
    el_min_deg: float = -30.6
    el_max_deg: float = 30.6
    fov_min_deg: float = 25.0
    fov_max_deg: float = 76.0
    aspect_min: float = 0.75
    aspect_max: float = 1.3333
    min_separation_deg: float = 0.0
    audio_mode: str = "foa"
    audio_features: str = "logmel"
    augment: bool = True
    volume_jitter: float = 0.1
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.2])
    flip_prob: float = 0.5
    equirect_height: int = 0
    shuffle_buffer: int = 16
    skip_missing_shards: bool = False
    decode_cpus: float = 1.0
    decode_threads: int = 1  # per decode task; 0 lets FFmpeg choose (up to one per core)
    decode_tasks: int = 0  # decode tasks at once at most (0: the CPUs Ray Train leaves free)
    read_ahead_batches: int = 4  # global batches Ray Data may hold ahead of the trainers
    seed: int = 0


@dataclass
class ModelConfig:
    """What `avsa.models.build_model` builds; presets: configs/model/*.yaml (`model=tiny`)."""

    name: str = "full"  # the preset these values came from: a label in MLflow and reports
    video_width: int = 64
    audio_width: int = 64
    embed_dim: int = 128
    transformer_depth: int = 2
    transformer_heads: int = 1
    transformer_dropout: float = 0.1
    spherical_pos_enc: bool = False
    use_transformer: bool = True
    init_from: str | None = None


@dataclass
class LossConfig:
    kind: str = "avsa"
    temperature: float = 0.07
    easy_negatives: str = "same_view"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 28
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 1e-5
    bf16: bool = True
    compile: bool = False
    curriculum: bool = False
    curriculum_avc_steps: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    val_every: int = 0
    val_batches: int = 4
    max_failures: int = 3
    seed: int = 0


@dataclass
class StorageConfig:
    path: str = "outputs/runs"
    run_name: str | None = None
    lease_wait_s: float = 0.0  # another run holds the run directory: wait this long (0: refuse)


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "avsa-pretrain"
    log_model: bool = True  # the final network as an MLflow model on the pretraining run
    model_name: str = "avsa-encoders"  # registered model for pretraining (and a sweep's best)
    system_metrics: bool = True  # CPU/GPU/memory/disk/network as system/* metrics
    system_metrics_interval_s: float = 10.0


@dataclass
class SweepConfig:
    name: str = "viewpoints_temperature"
    space: dict[str, Any] = field(default_factory=dict)
    search: str = "grid"
    num_samples: int = 1
    metric: str = "val/avsa_score"
    mode: str = "max"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int = 0
    report_every: int = 0


@dataclass
class DownstreamConfig:
    task: str = "avc_bin"
    pretrain: str = "scratch"
    mode: str = "frozen"
    # frozen heads: the most epochs (early stopping ends sooner); action finetune: exactly this
    epochs: int = 100
    lr: float = 1e-4
    batch_size: int = 16
    max_steps: int = 0
    eval_clips: int = 5
    fold: int = 1
    context: str = "video"
    experiment: str = "avsa-transfer"
    # frozen heads: fraction of training clips held out for early stopping (0: none)
    val_fraction: float = 0.2
    patience: int = 10  # epochs without a better held-out loss before stopping (0: never)
    feature_passes: int = 1  # augmented passes over the training split encoded for the cache
    seed: int | None = None  # head, shuffling and data windows; None: data.seed
    seg_class_weights: str = "median"  # median | inverse | none (segmentation loss)
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


def config_digest(cfg: Config, *, sweep: bool = False) -> str:
    """16 hex digits of sha256 over what shapes a run's checkpoints (all but storage, tracking
    and downstream). The sweep settings count only with `sweep` (a sweep's identity), all but
    `sweep.max_concurrent_trials`, which changes only how fast it runs."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_DIGEST}
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
    env = os.environ.get(CONFIG_DIR_ENV)
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "configs", Path.cwd() / "configs"]
    for c in candidates:
        if (c / "pretrain.yaml").is_file():
            return c
    raise ConfigError("configs", f"no config tree found (looked in {', '.join(map(str, candidates))})")


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="avsa_schema", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "pretrain") -> Config:
    """Compose `configs/<config_name>.yaml` with Hydra overrides into a validated `Config`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        check_known_keys(cfg, Config)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "override"
        raise ConfigError(key, _first_line(e)) from None
    except Exception as e:  # Hydra's override parser and missing-group errors
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            cause = e.__cause__
            if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
                raise ConfigError(cause.full_key, _first_line(cause)) from None
            raise ConfigError("override", _first_line(e)) from None
        raise
    finally:
        GlobalHydra.instance().clear()
    validate(obj)
    return obj


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a `Config` from `Config.to_dict()` output (e.g. a checkpoint's resolved config)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def _first_line(e: BaseException) -> str:
    """Hydra and OmegaConf errors span lines; keep the informative ones on one line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("full_key", "object_type", "reference_type", "Set the"))]
    return " — ".join(lines[:2]) or type(e).__name__


def _absolute(uri: str | None, cwd: Path) -> str | None:
    if not uri or "://" in uri:
        return uri
    return str((cwd / Path(uri).expanduser()).resolve())


def with_absolute_paths(cfg: Config, cwd: str | os.PathLike | None = None) -> Config:
    """A copy of cfg whose local data, storage and init paths are absolute against cwd (default:
    the current directory). Ray Train runs every worker in its own working directory, so a
    relative path means what the user meant only in the driver. URIs (s3://, file://) and
    MLflow run ids pass through."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    out = copy.deepcopy(cfg)
    out.data.shards = _absolute(out.data.shards, base)
    out.data.val_shards = _absolute(out.data.val_shards, base)
    out.storage.path = _absolute(out.storage.path, base)
    init = out.model.init_from
    if init and "://" not in init and (base / init).exists():
        out.model.init_from = _absolute(init, base)
    return out
