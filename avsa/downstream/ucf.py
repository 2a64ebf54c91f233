"""UCF101 / HMDB51 folder layouts for action-recognition transfer (video only, any audio).

UCF101 layout (the official archives unpacked into one folder):
    ROOT/classInd.txt                  "1 ApplyEyeMakeup" per line (1-based ids)
    ROOT/trainlist0N.txt               "ApplyEyeMakeup/v_..._g08_c01.avi 1" (label optional)
    ROOT/testlist0N.txt                "ApplyEyeMakeup/v_..._g01_c01.avi"
    ROOT/<Class>/<video>               videos, paths relative to ROOT as in the lists
The split files may also sit in ROOT/ucfTrainTestlist/ and the videos in ROOT/UCF-101/.

HMDB51 layout: ROOT/<class>/<video> and split files `<class>_test_splitN.txt` (in ROOT or
ROOT/testTrainMulti_7030_splits/) with "<video> 1" for training, "2" for testing, "0" unused;
classes are sorted by name.

Clips: `cfg.frames` frames at `cfg.fps` from a window start, the short side resized to
crop * 128 / 112, then a crop_size square: random crop and horizontal flip for training, the
centre for testing. Batches match the shard pipeline's: video (B, 1, 3, T, S, S) uint8,
labels (B, K) one-hot, key (list of B video paths relative to ROOT).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from avsa import media, storage
from avsa.config import DataConfig
from avsa.data.transform import sample_rng
from avsa.errors import MediaError

RESIZE_RATIO = 128 / 112  # short side before cropping, as in the usual 128 -> 112 protocol


@dataclass(frozen=True)
class VideoItem:
    path: Path
    label: int  # 0-based class index
    key: str  # path relative to the dataset root


@dataclass
class ActionLayout:
    root: Path
    classes: list[str]
    train: list[VideoItem]
    test: list[VideoItem]


def _split_dir(root: Path) -> tuple[str, Path] | None:
    """("ucf" or "hmdb", the folder of its split files) of a dataset root, or None."""
    for kind, sub, probe in (("ucf", "ucfTrainTestlist", "classInd.txt"),
                             ("hmdb", "testTrainMulti_7030_splits", "*_test_split1.txt")):
        for d in (root, root / sub):
            if any(d.glob(probe)):
                return kind, d
    return None


def is_layout(root: str | Path) -> bool:
    """True when `root` is a local folder with UCF101 or HMDB51 split files."""
    root = storage.local_path(root)
    return root.is_dir() and _split_dir(root) is not None


def _lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise MediaError(path, f"cannot read split file ({e.strerror or e})") from None
    return [ln.split() for ln in text.splitlines() if ln.strip()]


def _item(video_dirs: list[Path], rel: str, label: int, listed_in: Path) -> VideoItem:
    """The video `rel` in the first of video_dirs (the dataset root first) that holds it."""
    for d in video_dirs:
        if (d / rel).is_file():
            return VideoItem(d / rel, label, rel)
    raise MediaError(video_dirs[0] / rel, f"listed in {listed_in.name} but missing")


def _load_ucf(root: Path, splits: Path, fold: int) -> ActionLayout:
    index = splits / "classInd.txt"
    ids = {}
    for parts in _lines(index):
        if len(parts) != 2 or not parts[0].isdigit():
            raise MediaError(index, f"expected 'ID Class' lines, got {' '.join(parts)!r}")
        ids[parts[1]] = int(parts[0]) - 1
    classes = sorted(ids, key=ids.get)
    video_dirs = [root, root / "UCF-101"]
    out: dict[str, list[VideoItem]] = {"train": [], "test": []}
    for split, items in out.items():
        listing = splits / f"{split}list{fold:02d}.txt"
        for parts in _lines(listing):
            rel = parts[0].replace("\\", "/")
            cls = rel.split("/", 1)[0]
            if cls not in ids:
                raise MediaError(listing, f"class {cls!r} of {rel} not in classInd.txt")
            items.append(_item(video_dirs, rel, ids[cls], listing))
    return ActionLayout(root, classes, out["train"], out["test"])


def _load_hmdb(root: Path, splits: Path, fold: int) -> ActionLayout:
    suffix = f"_test_split{fold}.txt"
    files = sorted(splits.glob(f"*{suffix}"))
    classes = sorted(f.name.removesuffix(suffix) for f in files)
    out: dict[str, list[VideoItem]] = {"train": [], "test": []}
    for f in files:
        cls = f.name.removesuffix(suffix)
        for parts in _lines(f):
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise MediaError(f, f"expected 'video 0|1|2' lines, got {' '.join(parts)!r}")
            if parts[1] != "0":
                split = "train" if parts[1] == "1" else "test"
                out[split].append(_item([root], f"{cls}/{parts[0]}", classes.index(cls), f))
    return ActionLayout(root, classes, out["train"], out["test"])


def load_layout(root: str | Path, fold: int = 1) -> ActionLayout:
    """Classes and train/test video lists of split `fold` (1, 2 or 3).

    Raises MediaError naming the file for a missing split file, a malformed line or a listed
    video that is not there.
    """
    if fold not in (1, 2, 3):
        raise MediaError(root, f"fold must be 1, 2 or 3, got {fold}")
    root = storage.local_path(root)
    if (found := _split_dir(root)) is None:
        raise MediaError(root, "no classInd.txt (UCF101) or *_test_split1.txt (HMDB51) found")
    layout = (_load_ucf if found[0] == "ucf" else _load_hmdb)(root, found[1], fold)
    if not layout.train or not layout.test:
        raise MediaError(root, f"fold {fold} lists {len(layout.train)} training and "
                               f"{len(layout.test)} test videos; both must be > 0")
    return layout


def resize_crop(frames: np.ndarray, size: int, rng: np.random.Generator | None) -> torch.Tensor:
    """frames (T, H, W, 3) uint8 -> (3, T, size, size) uint8: short side to size * 128 / 112,
    then a random crop and a coin-flip mirror when rng is given, else the centre crop."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = round(size * RESIZE_RATIO) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    if rng is None:
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        top, left = int(rng.integers(nh - size + 1)), int(rng.integers(nw - size + 1))
    x = x[..., top : top + size, left : left + size]
    if rng is not None and rng.random() < 0.5:
        x = x.flip(-1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


def load_clip(item: VideoItem, cfg: DataConfig, start: float,
              rng: np.random.Generator | None, length: float = 0.0) -> torch.Tensor:
    """(3, T, S, S) uint8 clip of `item` from `start` seconds; a video shorter than the window
    (its `length` in seconds, 0 = unknown) has its last frame repeated."""
    window = cfg.frames / cfg.fps
    if length:
        window = min(window, length - start)
    if window <= 0:
        raise MediaError(item.path, f"no frames at {start:.3f} s (video is {length:.3f} s)")
    with warnings.catch_warnings(action="ignore"):  # not 2:1 equirect, as expected of UCF / HMDB
        frames = media.decode_video(item.path, fps=cfg.fps, start=start, duration=window)
    if len(frames) < cfg.frames:
        frames = np.concatenate([frames, np.repeat(frames[-1:], cfg.frames - len(frames), 0)])
    return resize_crop(frames[: cfg.frames], cfg.crop_size, rng)


@functools.cache
def _duration(path: Path) -> float:
    with warnings.catch_warnings(action="ignore"):  # not 2:1 equirect, as expected of UCF / HMDB
        return media.probe(path).video.duration


@dataclass
class LayoutSource:
    """A UCF101 / HMDB51 fold as a transfer source (see avsa.downstream.sources)."""

    layout: ActionLayout
    data: DataConfig
    batch_size: int
    seed: int = 0
    eval_clips: int = 1  # test pass p takes window p of eval_clips uniformly spaced ones
    single_label: bool = True

    @property
    def train_uri(self) -> str:
        return str(self.layout.root)

    test_uri = train_uri

    @property
    def num_classes(self) -> int:
        return len(self.layout.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.layout.classes)

    def _batches(self, items: list[VideoItem], where, rngs) -> Iterator[dict[str, Any]]:
        """Clips of `items` from where(item) in [0, 1] times the latest start that leaves a whole
        window, cropped by rngs(item) (None: the centre)."""
        window = self.data.frames / self.data.fps
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            clips = [load_clip(it, self.data, where(it) * max(0.0, _duration(it.path) - window),
                               rngs(it), _duration(it.path)) for it in chunk]
            labels = F.one_hot(torch.tensor([it.label for it in chunk]), self.num_classes).float()
            yield {"video": torch.stack(clips)[:, None], "labels": labels,
                   "key": [it.key for it in chunk]}

    def train(self, epoch: int) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.layout.train))
        return self._batches([self.layout.train[i] for i in order],
                             lambda it: sample_rng(self.seed, epoch, it.key + "#start").random(),
                             lambda it: sample_rng(self.seed, epoch, it.key))

    def test(self, pass_index: int = 0) -> Iterator[dict[str, Any]]:
        n = max(1, self.eval_clips)
        frac = 0.5 if n == 1 else pass_index / (n - 1)
        return self._batches(self.layout.test, lambda it: frac, lambda it: None)
