"""UCF101 / HMDB51 folder layouts: split files, labels, clips from videos with any audio."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from presets import tiny_model

from avsa import media
from avsa.config import DataConfig, DownstreamConfig
from avsa.downstream import ucf
from avsa.downstream.run import run_task
from avsa.encode import encode_clip
from avsa.errors import MediaError

CLASSES = ["Jump", "Run", "Swim"]
CFG = DataConfig(fps=8.0, frames=4, crop_size=16)


def write_video(path: Path, level: int, audio_channels: int, seconds: float = 1.0) -> None:
    """A 40x32 clip at 8 fps of grey `level` with no (0), stereo (2) or FOA (4) AAC audio."""
    frames = np.full((round(8 * seconds), 32, 40, 3), level, np.uint8)
    frames[:, :, :10] = 255 - level  # something to crop
    if audio_channels == 4:
        encode_clip(path, frames, 8.0, np.zeros((4, round(24000 * seconds)), np.float32),
                          24000)
        return
    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=Fraction(8))
        vs.width, vs.height, vs.pix_fmt = 40, 32, "yuv420p"
        aus = c.add_stream("aac", rate=24000, layout="stereo") if audio_channels else None
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
        if aus is not None:
            samples = np.zeros((2, 1024), np.float32)
            for s in range(0, round(24000 * seconds), 1024):
                af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
                af.sample_rate, af.pts = 24000, s
                c.mux(aus.encode(af))
            c.mux(aus.encode(None))


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory) -> Path:
    """3 classes x 3 groups; fold k tests group k. Audio: none, stereo and 4-channel."""
    root = tmp_path_factory.mktemp("ucf")
    (root / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    for ci, cls in enumerate(CLASSES):
        (root / cls).mkdir()
        for g in (1, 2, 3):
            write_video(root / cls / f"v_{cls}_g0{g}_c01.mp4", 60 * ci + 20, (0, 2, 4)[g - 1])
    for fold in (1, 2, 3):
        train = [f"{c}/v_{c}_g0{g}_c01.mp4 {i + 1}" for i, c in enumerate(CLASSES)
                 for g in (1, 2, 3) if g != fold]
        test = [f"{c}/v_{c}_g0{fold}_c01.mp4" for c in CLASSES]
        (root / f"trainlist0{fold}.txt").write_text("\n".join(train) + "\n")
        (root / f"testlist0{fold}.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.mark.parametrize("fold", [1, 2, 3])
def test_ucf_layout_lists_each_fold(ucf_root, fold):
    assert ucf.is_layout(ucf_root)
    layout = ucf.load_layout(ucf_root, fold)
    assert layout.classes == CLASSES
    assert len(layout.train) == 6 and len(layout.test) == 3
    assert all(f"_g0{fold}_" in it.key for it in layout.test)
    assert not any(f"_g0{fold}_" in it.key for it in layout.train)
    for it in layout.train + layout.test:
        assert CLASSES[it.label] == it.key.split("/")[0] and it.path.is_file()


def test_layout_source_batches_decode_video_only(ucf_root):
    layout = ucf.load_layout(ucf_root, 1)
    src = ucf.LayoutSource(layout, CFG, batch_size=4, eval_clips=2)
    batches = list(src.train(0))
    assert [len(b["key"]) for b in batches] == [4, 2]
    b = batches[0]
    assert b["video"].shape == (4, 1, 3, 4, 16, 16) and b["video"].dtype == torch.uint8
    assert b["labels"].sum(1).tolist() == [1.0] * 4
    assert sorted(k for b in batches for k in b["key"]) == sorted(it.key for it in layout.train)
    test0 = next(src.test(0))  # g01 videos have no audio stream at all
    again = next(src.test(0))
    assert torch.equal(test0["video"], again["video"])  # centre crops, fixed windows
    assert test0["labels"].argmax(1).tolist() == [0, 1, 2]
    # Swim (level 140): the centre crop shows the clip's grey level
    assert abs(int(test0["video"][2, 0, 0, 0, 8, 8]) - 140) <= 6


def test_short_video_repeats_its_last_frame(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, 100, 0, seconds=0.25)  # 2 frames at 8 fps, window wants 4
    item = ucf.VideoItem(path, 0, "short.mp4")
    with pytest.warns(UserWarning, match="not 2:1"):
        length = media.probe(path).video.duration
    clip = ucf.load_clip(item, CFG, 0.0, None, length=length)
    assert clip.shape == (3, 4, 16, 16)


def test_missing_video_and_bad_fold_name_the_problem(ucf_root, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "classInd.txt").write_text("1 Jump\n")
    (broken / "trainlist01.txt").write_text("Jump/gone.avi 1\n")
    (broken / "testlist01.txt").write_text("Jump/gone.avi\n")
    with pytest.raises(MediaError, match=r"gone\.avi: listed in trainlist01\.txt but missing"):
        ucf.load_layout(broken, 1)
    with pytest.raises(MediaError, match="fold must be 1, 2 or 3"):
        ucf.load_layout(ucf_root, 4)
    assert not ucf.is_layout(tmp_path / "nowhere")
    with pytest.raises(MediaError, match=r"no classInd\.txt"):
        ucf.load_layout(tmp_path)


def test_hmdb_layout(ucf_root, tmp_path):
    root = tmp_path / "hmdb"
    for cls in ("clap", "wave"):
        (root / cls).mkdir(parents=True)
        for i in (1, 2, 3):
            (root / cls / f"{cls}{i}.avi").symlink_to(ucf_root / "Jump" / "v_Jump_g01_c01.mp4")
        (root / f"{cls}_test_split1.txt").write_text(
            f"{cls}1.avi 1\n{cls}2.avi 2\n{cls}3.avi 0\n")
    assert ucf.is_layout(root)
    layout = ucf.load_layout(root, 1)
    assert layout.classes == ["clap", "wave"]
    assert [(it.key, it.label) for it in layout.train] == [("clap/clap1.avi", 0),
                                                           ("wave/wave1.avi", 1)]
    assert [it.key for it in layout.test] == ["clap/clap2.avi", "wave/wave2.avi"]


def test_action_transfer_on_a_ucf_fold(ucf_root):
    torch.manual_seed(0)
    layout = ucf.load_layout(ucf_root, 2)
    src = ucf.LayoutSource(layout, CFG, batch_size=6, eval_clips=2)
    logged = []
    ds = DownstreamConfig(task="action", mode="finetune", epochs=2, lr=1e-3, eval_clips=2)
    m = run_task(ds, tiny_model(), src, seed=0, device=torch.device("cpu"),
                 log=lambda metrics, s: logged.append(s))
    assert logged == [0, 1]
    assert m["test/videos"] == 3
    for k in ("test/clip_acc", "test/video_acc"):
        assert m[k] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_a_ucf_transfer_reports_the_layouts_class_names(ucf_root, mlflow_uri, tmp_path):
    """per_class.csv and the confusion matrix name UCF's classes, not the synthetic ones."""
    import csv
    import uuid

    from mlflow.tracking import MlflowClient

    from avsa.config import compose
    from avsa.downstream.run import run_transfer

    cfg = compose(["model=tiny", "data.fps=8", "data.frames=4", "data.crop_size=16",
                   f"data.shards={ucf_root}", f"tracking.uri={mlflow_uri}",
                   f"downstream.experiment=ucf-{uuid.uuid4().hex[:8]}", "downstream.task=action",
                   "downstream.mode=linear", "downstream.epochs=1", "downstream.batch_size=6",
                   "downstream.eval_clips=1"])
    res = run_transfer(cfg)
    path = MlflowClient(mlflow_uri).download_artifacts(res.run_id, "report/per_class.csv",
                                                       str(tmp_path))
    with open(path) as f:
        assert [row["class"] for row in csv.DictReader(f)] == CLASSES
