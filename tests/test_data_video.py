"""Video data: real files encoded with PyAV and read back through the annotation lists, frame folders, clip
sampling, clip transforms, multi-view test views, and unreadable / truncated / missing videos."""

from __future__ import annotations

import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swinlab.config import DataConfig
from swinlab.data import build
from swinlab.data.video import (
    FrameFolder,
    PyAVVideo,
    VideoClips,
    VideoList,
    VideoReadError,
    VideoTransform,
    crop_boxes,
    read_annotations,
    sample_clips,
)

av = pytest.importorskip("av")

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def _frame(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    """Frame i: flat grey level 20 * (i mod 13) (survives lossy coding to within a few levels), so the decoded
    value tells which frame was read."""
    return np.full((h, w, 3), 20 * (i % 13), np.uint8)


def write_video(path: Path, n: int = 10, codec: str = "mpeg4", h: int = 24, w: int = 32, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_frame(i, h, w), format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Which frame each decoded frame is (inverse of ``_frame``)."""
    return [round(float(f.float().mean()) / 20) for f in frames]


@pytest.mark.parametrize(("ext", "codec"), [("mp4", "mpeg4"), ("avi", "mpeg4"), ("mkv", "libx264")])
def test_pyav_reads_the_frames_asked_for(tmp_path, ext, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this PyAV build")
    video = PyAVVideo(write_video(tmp_path / f"v.{ext}", n=10, codec=codec))
    assert video.num_frames == 10  # mkv has no count in its header: counted from the packets
    frames = video.read([7, 2, 2, 9])
    assert frames.shape == (4, 3, 24, 32) and frames.dtype == torch.uint8
    assert frame_ids(frames) == [7, 2, 2, 9]


def test_unreadable_and_truncated_files_raise_with_their_path(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoReadError, match=r"junk\.mp4"):
        PyAVVideo(junk)
    # moov atom first (faststart), so the header still promises 40 frames after the file is cut in half
    full = write_video(tmp_path / "full.mp4", n=40, h=48, w=64, movflags="faststart")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    video = PyAVVideo(cut)
    assert video.num_frames == 40
    assert frame_ids(video.read([0, 1])) == [0, 1]  # the part that is there still reads
    with pytest.raises(VideoReadError, match=r"cut\.mp4: truncated"):
        video.read([0, 39])


def test_frame_folder(tmp_path):
    for i in (3, 1, 0, 2):  # written out of order: frames are taken in name order
        Image.fromarray(_frame(i)).save(tmp_path / f"img_{i + 1:05d}.jpg")
    (tmp_path / "notes.txt").write_text("not a frame")
    folder = FrameFolder(tmp_path)
    assert folder.num_frames == 4
    assert frame_ids(folder.read([3, 0, 3])) == [3, 0, 3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoReadError, match="no frames"):
        FrameFolder(tmp_path / "empty")


def test_sample_clips_train_and_test():
    # test: uniform clips, each centred in its segment of start offsets (30 - 8 + 1 = 23 offsets, 4 segments)
    clips = sample_clips(30, clip_len=4, frame_interval=2, num_clips=4)
    assert [c[0] for c in clips] == [2, 8, 14, 20]
    assert all(np.diff(c).tolist() == [2, 2, 2] for c in clips)
    assert sample_clips(30, 4, 2, 4) == clips  # deterministic
    # train: a random offset, the whole clip inside the video
    starts = {sample_clips(30, 4, 2, rng=random.Random(s))[0][0] for s in range(200)}
    assert starts == set(range(23))
    # a video shorter than a clip: starts at 0 and wraps around
    assert sample_clips(5, 4, 2) == [[0, 2, 4, 1]]
    with pytest.raises(ValueError, match="clip_len"):
        sample_clips(10, 0, 2)


def test_crop_boxes_and_transform_shapes():
    assert crop_boxes(8, 12, 8, 3) == [(0, 0), (0, 2), (0, 4)]  # along the longer side
    assert crop_boxes(12, 8, 8, 3) == [(0, 0), (2, 0), (4, 0)]
    with pytest.raises(ValueError, match="num_crops"):
        crop_boxes(8, 8, 8, 2)
    frames = torch.randint(0, 256, (5, 3, 30, 40), dtype=torch.uint8)
    test = VideoTransform(16, train=False, num_crops=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    views = test(frames)
    assert views.shape == (3, 3, 5, 16, 16)  # (crops, C, T, H, W)
    assert views.min() >= -1 - 1e-6 and views.max() <= 1 + 1e-6
    assert not torch.equal(views[0], views[2])  # left and right crops differ
    train = VideoTransform(16, train=True, augment="standard")
    a, b = train(frames, random.Random(0)), train(frames, random.Random(0))
    assert a.shape == (3, 5, 16, 16) and torch.equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        train(frames)
    with pytest.raises(ValueError, match="RGB frames"):
        train(frames[:, :1], random.Random(0))
    with pytest.raises(ValueError, match="augment"):
        VideoTransform(16, train=True, augment="light")


def test_transform_keeps_one_box_and_flip_for_all_frames():
    frame = torch.arange(3 * 20 * 20, dtype=torch.float32).view(3, 20, 20) % 256
    clip = frame.to(torch.uint8).expand(4, -1, -1, -1)  # a static clip
    out = VideoTransform(12, train=True, augment="crop", hflip=True)(clip, random.Random(3))
    assert all(torch.equal(out[:, 0], out[:, t]) for t in range(4))


def _dataset(tmp_path: Path) -> Path:
    """train.txt / val.txt over mp4 files and a frame folder, in class folders, labels 0 and 1."""
    root = tmp_path / "kinetics"
    write_video(root / "abseiling" / "a.mp4", n=12)
    write_video(root / "abseiling" / "b.avi", n=9)
    frames = root / "archery" / "c"
    frames.mkdir(parents=True)
    for i in range(10):
        Image.fromarray(_frame(i)).save(frames / f"img_{i:05d}.jpg")
    (root / "train.txt").write_text("abseiling/a.mp4 0\narchery/c 10 1\n")  # the rawframes form for c
    (root / "val.txt").write_text("abseiling/b.avi 0\narchery/c 1\n")
    return root


def test_annotation_lists_and_kinetics_csv(tmp_path):
    root = _dataset(tmp_path)
    records, classes, missing = read_annotations(root / "train.txt")
    assert [(r.path.name, r.label) for r in records] == [("a.mp4", 0), ("c", 1)] and not missing
    assert classes == ["0", "1"]
    write_video(root / "archery" / "xyz_000010_000020.mp4", n=6)
    write_video(root / "abc_000000_000010.mp4", n=6)  # the flat layout
    (root / "k400.csv").write_text(
        "label,youtube_id,time_start,time_end,split\narchery,xyz,10,20,train\nabseiling,abc,0,10,train\n"
    )
    records, classes, _ = read_annotations(root / "k400.csv")
    assert classes == ["abseiling", "archery"]
    assert [(r.path.relative_to(root).as_posix(), r.label) for r in records] == [
        ("archery/xyz_000010_000020.mp4", 1),
        ("abc_000000_000010.mp4", 0),
    ]
    (root / "bad.csv").write_text("video,class\na.mp4,0\n")
    with pytest.raises(ValueError, match="path,label"):
        read_annotations(root / "bad.csv")
    (root / "bad.txt").write_text("just_a_path.mp4\n")
    with pytest.raises(ValueError, match=r"bad.txt:1"):
        read_annotations(root / "bad.txt")


def test_one_class_mapping_for_every_split_and_labels_outside_it_are_named(tmp_path):
    root = _dataset(tmp_path)
    twelve = [f"abseiling/a.mp4 {i}" for i in range(12)]
    (root / "typo.txt").write_text("\n".join([*twelve[:10], "abseiling/a.mp4 1O", *twelve[10:]]) + "\n")
    with pytest.raises(ValueError, match=r"typo\.txt:11: label '1O' is not a number"):
        read_annotations(root / "typo.txt")
    (root / "train12.txt").write_text("\n".join(twelve) + "\n")
    _, classes, _ = read_annotations(root / "train12.txt")
    (root / "val12.txt").write_text("abseiling/b.avi 10\narchery/c 07\n")  # validation goes by the same names
    records, _, _ = read_annotations(root / "val12.txt", classes=classes)
    assert [r.label for r in records] == [10, 7]
    (root / "val13.txt").write_text("abseiling/b.avi 12\n")
    with pytest.raises(ValueError, match=r"val13\.txt:1: label '12' of b\.avi is not one of the run's 12 classes"):
        read_annotations(root / "val13.txt", classes=classes)


def test_missing_videos_reported_at_build_with_count(tmp_path):
    root = _dataset(tmp_path)
    (root / "more.txt").write_text("abseiling/a.mp4 0\nabseiling/gone.mp4 0\narchery/gone2.mp4 1\n")
    with pytest.warns(RuntimeWarning, match=r"2 of 3 listed videos are missing.*gone\.mp4"):
        videos = VideoList(root / "more.txt")
    assert len(videos) == 1
    (root / "none.txt").write_text("gone.mp4 0\n")
    with pytest.raises(FileNotFoundError, match="1 of 1 listed videos are missing"):
        VideoList(root / "none.txt")


def test_clips_through_the_loader_with_multi_view_testing(tmp_path):
    root = _dataset(tmp_path)
    cfg = DataConfig(
        name="video", root=str(root), train_list="train.txt", val_list="val.txt", img_size=16, clip_len=3,
        frame_interval=2, test_clips=2, test_crops=3, batch_size=2, augment="crop",
    )  # fmt: skip
    bundle = build(cfg, seed=0)
    assert bundle.kind == "video" and bundle.model_kwargs == {"num_classes": 2, "in_chans": 3}
    assert (bundle.train_size, bundle.val_size) == (2, 2)
    clips, labels = next(iter(bundle.train_loader))
    assert clips.shape == (2, 3, 3, 16, 16) and sorted(labels.tolist()) == [0, 1]
    views, labels = next(iter(bundle.val_loader))
    assert views.shape == (2, 6, 3, 3, 16, 16) and labels.tolist() == [0, 1]  # 2 clips x 3 crops
    # the views are the uniformly sampled clips: b.avi has 9 frames, 9 - 6 + 1 = 4 offsets -> starts 1 and 3
    tf = bundle.val_loader.dataset.transform
    pixels = (views[0, ::3] + tf._shift) / tf._scale  # back to 0-255: (clips, C, T, H, W)
    assert torch.allclose(pixels.mean(dim=(1, 3, 4)) / 20, torch.tensor([[1.0, 3, 5], [3, 5, 7]]), atol=0.3)


def test_unreadable_video_skipped_once_reported_and_counted(tmp_path):
    root = _dataset(tmp_path)
    (root / "abseiling" / "broken.mp4").write_bytes(b"\x00" * 1000)
    (root / "train.txt").write_text("abseiling/a.mp4 0\nabseiling/broken.mp4 0\narchery/c 1\n")
    videos = VideoList(root / "train.txt")
    clips = VideoClips(videos, VideoTransform(16, train=True, augment="none", hflip=False), clip_len=2)
    with pytest.warns(RuntimeWarning, match="broken.mp4"):
        assert clips[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        assert clips[1] is None
    assert clips[0][0].shape == (3, 2, 16, 16)

    from swinlab.engine.loop import run_evaluation  # the engine counts what the loader could not deliver
    from swinlab.tasks import ClassificationTask

    cfg = DataConfig(
        name="video", root=str(root), train_list="train.txt", val_list="train.txt", img_size=16, clip_len=2,
        batch_size=3, test_clips=2,
    )  # fmt: skip
    bundle = build(cfg, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        metrics = run_evaluation(model, ClassificationTask(views=True), bundle.val_loader)
    assert metrics["val_skipped_samples"] == 1


def test_video_config_errors(tmp_path):
    with pytest.raises(ValueError, match="train_list"):
        build(DataConfig(name="video", root=str(tmp_path)), seed=0)
    with pytest.raises(ValueError, match="hflip"):
        build(DataConfig(name="motion_demo"), seed=0)
    with pytest.raises(ValueError, match="RGB"):
        build(DataConfig(name="motion_demo", hflip=False, in_chans=1), seed=0)


@pytest.mark.skipif(not VTEST.is_file(), reason=f"{VTEST} not present (Debian package opencv-doc)")
def test_smoke_read_of_a_real_clip():
    video = PyAVVideo(VTEST)
    assert video.num_frames == 795
    frames = video.read(sample_clips(video.num_frames, 8, 2, num_clips=1)[0])
    assert frames.shape == (8, 3, 576, 768) and frames.float().std() > 10
    views = VideoTransform(64, train=False, num_crops=3)(frames)
    assert views.shape == (3, 3, 8, 64, 64) and torch.isfinite(views).all()


def test_missing_pyav_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install swinlab[video]")):
        PyAVVideo(tmp_path / "x.mp4")


@pytest.mark.slow  # a fresh interpreter: torch's import alone takes seconds
def test_core_imports_without_pyav(tmp_path):
    """PyAV is an extra: without it swinlab, its data package and the generated demo work, and opening a video
    file says which extra to install."""
    import subprocess

    code = f"""
import sys
sys.modules["av"] = None  # makes `import av` raise ImportError
import swinlab, swinlab.data
from swinlab.config import DataConfig
bundle = swinlab.data.build(DataConfig(name="motion_demo", hflip=False, clip_len=2, img_size=16, val_limit=2), seed=0)
assert next(iter(bundle.val_loader))[0].shape == (2, 1, 3, 2, 16, 16)
from swinlab.data.video import PyAVVideo
try:
    PyAVVideo({str(tmp_path / "x.mp4")!r})
except ImportError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install swinlab[video]" in out.stdout
