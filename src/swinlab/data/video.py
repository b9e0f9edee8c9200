"""Video classification data: Kinetics-style annotation lists over video files (decoded with PyAV) or frame
folders, the Video Swin frame sampling, clip transforms and multi-view testing.

Formats:

* an annotation list, one video per line: ``relative/path.mp4 label`` (mmaction's ``VideoDataset`` list; a
  third field in the middle, ``frame_dir total_frames label`` as mmaction's ``RawframeDataset`` writes it, is
  accepted and the count ignored: it is read from the folder). Paths are relative to ``root``; labels are
  class indices;
* the CSV form, with a header: either ``path,label`` columns, or the official Kinetics columns
  ``label,youtube_id,time_start,time_end[,split,...]``, whose videos are named
  ``<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`` (the layout the common Kinetics downloaders write; a flat
  ``<youtube_id>_<start>_<end>.mp4`` is found too). Class names become indices in sorted order (the order of
  mmaction's Kinetics label maps); numeric labels are taken as indices;
* a path naming a *folder* is a frame folder: its ``*.jpg`` / ``*.jpeg`` / ``*.png`` files in name order are
  the frames.

Frame sampling follows the paper's recipes (mmaction ``SampleFrames``): a clip is ``clip_len`` frames taken every
``frame_interval`` frames (K400: 32 x 2). Training takes one clip at a random offset; testing takes
``num_clips`` clips spread uniformly over the video, each centred in its segment (K400: 4 clips), and every
clip is cut into ``num_crops`` crops (K400: 3); the scores of all views are averaged per video by the
classification task. Clips running past the last frame wrap around to the start (mmaction's default
``out_of_bound_opt='loop'``).

Unreadable and truncated videos are reported once with their path (a ``RuntimeWarning``) and their sample comes
back as ``None``: the collate function drops it and the engine counts the skipped samples per epoch. An
annotation naming a video that does not exist is reported when the dataset is built, with the count, and
dropped.

PyAV is an optional dependency (``pip install swinlab[video]``), imported only when a video file is opened.
"""

from __future__ import annotations

import csv
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from swinlab.config import DataConfig
from swinlab.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from swinlab.data.transforms import random_resized_crop_box, rrc_scale

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
KINETICS_MEAN = IMAGENET_MEAN
"""The Video Swin configs' pixel mean (123.675, 116.28, 103.53) / 255: ImageNet's."""
KINETICS_STD = IMAGENET_STD
TRUNCATION_TOLERANCE = 0.05
"""Container headers often over-count a video by a frame or two; a shortfall up to this fraction (at least two
frames) is served by repeating the last decoded frame, a larger one means the file is truncated."""
AUGMENTS = ("standard", "crop", "none")


class VideoReadError(RuntimeError):
    """A video that cannot be decoded (corrupt, truncated, not a video)."""


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install swinlab[video]  (or pip install av)") from None
    return av


# -- one video: its frame count and the frames at some indices ----------------------------------------------


class Video(Protocol):
    num_frames: int

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 frames ``(len(indices), C, H, W)`` in the order of ``indices`` (repeats allowed)."""
        ...


class PyAVVideo:
    """A video file decoded with PyAV. The frame count comes from the container header, or from counting the
    packets when the header has none (e.g. Matroska). Frames are decoded sequentially up to the last index
    asked for: no seeking, whose keyframe granularity would make the sampled indices inexact."""

    def __init__(self, path: str | Path) -> None:
        av = _import_av()
        self.path = Path(path)
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise VideoReadError(f"{self.path}: no video stream")
                stream = container.streams.video[0]
                frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError as e:
            raise VideoReadError(f"{self.path}: {e}") from None
        if frames < 1:
            raise VideoReadError(f"{self.path}: no frames")
        self.num_frames = frames

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        av = _import_av()
        wanted = set(indices)
        last = max(wanted)
        found: dict[int, np.ndarray] = {}
        decoded = 0
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    decoded = i + 1
                    if i in wanted:
                        found[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        except av.error.FFmpegError as e:
            raise VideoReadError(f"{self.path}: decoding failed after {decoded} frames: {e}") from None
        if decoded <= last:
            shortfall = self.num_frames - decoded
            if decoded == 0 or shortfall > max(2, TRUNCATION_TOLERANCE * self.num_frames):
                raise VideoReadError(
                    f"{self.path}: truncated, the header promises {self.num_frames} frames but only {decoded} decode"
                )
            tail = found.get(decoded - 1)
            if tail is None:  # the last decoded frame was not wanted: decode again up to it
                return self.read([min(i, decoded - 1) for i in indices])
            found.update({i: tail for i in wanted if i >= decoded})
        frames = np.stack([found[i] for i in indices])
        return torch.from_numpy(frames).permute(0, 3, 1, 2)


class FrameFolder:
    """One folder of image files per video, frames in file-name order (``img_00001.jpg``, ...)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
        if not self.files:
            raise VideoReadError(f"{self.path}: no frames ({', '.join(FRAME_EXTENSIONS)})")
        self.num_frames = len(self.files)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        from PIL import Image

        cache: dict[int, torch.Tensor] = {}
        for i in dict.fromkeys(indices):
            try:
                with Image.open(self.files[i]) as img:
                    cache[i] = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
            except (OSError, SyntaxError, ValueError) as e:
                raise VideoReadError(f"{self.files[i]}: {e}") from None
        shapes = {tuple(t.shape) for t in cache.values()}
        if len(shapes) > 1:
            raise VideoReadError(f"{self.path}: frames of different sizes {sorted(shapes)}")
        return torch.stack([cache[i] for i in indices])


def open_video(path: str | Path) -> Video:
    """A frame folder for a directory, else a video file decoded with PyAV."""
    path = Path(path)
    return FrameFolder(path) if path.is_dir() else PyAVVideo(path)


# -- annotation lists -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoRecord:
    path: Path
    label: int


def _kinetics_name(row: dict[str, str]) -> str:
    return f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"


Entry = tuple[Path, str, int]
"""A listed video: its path, its label as written, and the line it is on (for error messages)."""


def _read_csv(path: Path, root: Path) -> list[Entry]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if {"path", "label"} <= columns:
            return [(root / row["path"], row["label"], reader.line_num) for row in reader]
        if {"label", "youtube_id", "time_start", "time_end"} <= columns:
            entries = []
            for row in reader:
                nested = root / row["label"] / _kinetics_name(row)
                video = nested if nested.exists() else root / _kinetics_name(row)
                entries.append((video, row["label"], reader.line_num))
            return entries
    raise ValueError(
        f"{path}: a CSV annotation file needs the columns path,label or label,youtube_id,time_start,time_end; "
        f"found {sorted(columns)}"
    )


def _read_list(path: Path, root: Path) -> list[Entry]:
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) not in (2, 3):
            raise ValueError(
                f"{path}:{lineno}: expected 'path label' (or 'frame_dir total_frames label'), got {line!r}"
            )
        entries.append((root / fields[0], fields[-1], lineno))
    return entries


def _label_names(path: Path, entries: list[Entry]) -> list[str]:
    """Each entry's class name: numeric labels are indices, written in one canonical form (``07`` is ``7``). A list
    of numbers with a few words among them is a typo (``1O`` for ``10``), not a list of names: string-sorting it
    would renumber half the classes, and differently from the other splits."""
    numeric = [label.isdigit() for _, label, _ in entries]
    if any(numeric) and not all(numeric):
        _, label, lineno = entries[numeric.index(False)]
        raise ValueError(
            f"{path}:{lineno}: label {label!r} is not a number, but the list's other labels are class indices; "
            "fix the label (or name every class)"
        )
    return [str(int(label)) if is_number else label for (_, label, _), is_number in zip(entries, numeric, strict=True)]


def read_annotations(
    path: str | Path, root: str | Path | None = None, classes: Sequence[str] | None = None
) -> tuple[list[VideoRecord], list[str], list[Path]]:
    """Parse an annotation list or CSV (see the module docstring); paths relative to ``root`` (default: the
    file's folder). Returns ``(records of existing videos, class names, missing paths)``.

    ``classes`` fixes the name -> index map (pass the training set's to every other split, so all splits of a run
    share one mapping); without it the names found are sorted, and numeric labels ``0..K-1`` are named by their
    number. A label outside the map is an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    root = Path(root) if root is not None else path.parent
    entries = _read_csv(path, root) if path.suffix.lower() == ".csv" else _read_list(path, root)
    if not entries:
        raise ValueError(f"{path}: no videos listed")
    names = _label_names(path, entries)
    if classes is None:
        numeric = names[0].isdigit()
        classes = [str(i) for i in range(max(map(int, names)) + 1)] if numeric else sorted(set(names))
    classes = list(classes)
    index = {name: i for i, name in enumerate(classes)}
    records, missing = [], []
    for (video, label, lineno), name in zip(entries, names, strict=True):
        if name not in index:
            raise ValueError(
                f"{path}:{lineno}: label {label!r} of {video.name} is not one of the run's {len(classes)} classes "
                f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})"
            )
        if video.exists():
            records.append(VideoRecord(video, index[name]))
        else:
            missing.append(video)
    return records, classes, missing


class VideoSource(Protocol):
    """Indexable videos with labels: what :class:`VideoClips` samples from."""

    classes: list[str]

    def __len__(self) -> int: ...

    def label(self, index: int) -> int: ...

    def open(self, index: int) -> Video:
        """The video; raises :class:`VideoReadError` when it cannot be read."""
        ...

    def describe(self, index: int) -> str:
        """How a report names this video (its path)."""
        ...


class VideoList:
    """The videos of an annotation file (video files or frame folders), missing ones reported and dropped."""

    def __init__(
        self, annotations: str | Path, root: str | Path | None = None, classes: Sequence[str] | None = None
    ) -> None:
        self.records, self.classes, missing = read_annotations(annotations, root, classes)
        if missing:
            shown = ", ".join(str(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
            message = f"{annotations}: {len(missing)} of {len(missing) + len(self.records)} listed videos are missing"
            if not self.records:
                raise FileNotFoundError(f"{message} (all of them): {shown}")
            warnings.warn(f"{message} and are skipped: {shown}", RuntimeWarning, stacklevel=2)
        self.missing = missing

    def __len__(self) -> int:
        return len(self.records)

    def label(self, index: int) -> int:
        return self.records[index].label

    def open(self, index: int) -> Video:
        return open_video(self.records[index].path)

    def describe(self, index: int) -> str:
        return str(self.records[index].path)


# -- frame sampling -------------------------------------------------------------------------------------------


def sample_clips(
    num_frames: int, clip_len: int, frame_interval: int, num_clips: int = 1, rng: random.Random | None = None
) -> list[list[int]]:
    """Frame indices of ``num_clips`` clips of ``clip_len`` frames, ``frame_interval`` apart.

    With ``rng`` (training): the video is cut into ``num_clips`` equal segments of possible start offsets and
    each clip starts at a random offset in its segment. Without (testing): each clip starts at the centre of
    its segment, so the clips cover the video uniformly and deterministically. A video shorter than one clip
    starts at 0; indices past the end wrap around.
    """
    if min(num_frames, clip_len, frame_interval, num_clips) < 1:
        raise ValueError(
            f"num_frames, clip_len, frame_interval and num_clips must be >= 1, got "
            f"{num_frames}, {clip_len}, {frame_interval}, {num_clips}"
        )
    span = clip_len * frame_interval
    starts_available = num_frames - span + 1  # offsets at which a whole clip fits
    segment = starts_available / num_clips
    if starts_available <= 0:
        starts = [0] * num_clips
    elif rng is None:
        starts = [int(k * segment + segment / 2) for k in range(num_clips)]
    elif segment >= 1:
        starts = [int(k * segment) + rng.randrange(int(segment)) for k in range(num_clips)]
    else:  # more clips than start offsets: random starts, in order
        starts = sorted(rng.randrange(starts_available) for _ in range(num_clips))
    return [[(s + j * frame_interval) % num_frames for j in range(clip_len)] for s in starts]


# -- spatial transforms on (T, C, H, W) clips ---------------------------------------------------------------


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of ``(T, C, H, W)`` frames; float32 on the 0-255 scale."""
    x = frames.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_short_side(frames: torch.Tensor, short: int) -> torch.Tensor:
    h, w = frames.shape[-2:]
    scale = short / min(h, w)
    return resize_frames(frames, (max(short, round(h * scale)), max(short, round(w * scale))))


def crop_boxes(height: int, width: int, size: int, num_crops: int) -> list[tuple[int, int]]:
    """Top-left corners of the test crops: the centre (1 crop), or three crops along the longer side
    (start, centre, end; mmaction's ``ThreeCrop``)."""
    if height < size or width < size:
        raise ValueError(f"cannot crop {size} px from frames of {height}x{width}")
    centre = ((height - size) // 2, (width - size) // 2)
    if num_crops == 1:
        return [centre]
    if num_crops != 3:
        raise ValueError(f"num_crops must be 1 (centre) or 3 (three crops), got {num_crops}")
    if width >= height:
        return [(centre[0], left) for left in (0, centre[1], width - size)]
    return [(top, centre[1]) for top in (0, centre[0], height - size)]


class VideoTransform:
    """uint8 ``(T, C, H, W)`` frames -> float32 normalised clips ``(C, T, size, size)``.

    Training (``train=True``): the short side is resized to ``scale_size`` (default ``size / 0.875``, 256 for
    224), then ``augment`` picks the crop: ``standard`` a random resized crop (area 8-100% at >= 128 px, as
    the Video Swin configs; milder for tiny clips, see :func:`swinlab.data.transforms.rrc_scale`), ``crop`` a
    random ``size`` crop, ``none`` the centre crop; then a horizontal flip with probability 0.5 when
    ``hflip``. One crop box and one flip for all frames of a clip.
    Testing: the short side is resized to ``size`` (K400 test pipeline) and ``num_crops`` crops (1 or 3) are
    returned as ``(num_crops, C, T, size, size)``.
    """

    def __init__(
        self,
        size: int,
        *,
        train: bool,
        augment: str = "standard",
        hflip: bool = True,
        scale_size: int | None = None,
        num_crops: int = 1,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
    ) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"unknown video augment {augment!r} (choose from {', '.join(AUGMENTS)})")
        if size < 1:
            raise ValueError(f"crop size must be positive, got {size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need three values (RGB), std positive; got {mean}, {std}")
        crop_boxes(size, size, size, num_crops)  # validates num_crops
        self.size, self.train, self.augment, self.hflip = size, train, augment, hflip and train
        self.scale_size = scale_size or round(size / 0.875)
        if self.scale_size < size:
            raise ValueError(f"scale_size {self.scale_size} is smaller than the crop size {size}")
        self.num_crops = 1 if train else num_crops
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1) / std_t

    @property
    def is_random(self) -> bool:
        return self.train and (self.augment != "none" or self.hflip)

    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.transpose(0, 1) * self._scale - self._shift  # (T, C, H, W) -> (C, T, H, W)

    def __call__(self, frames: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected RGB frames (T, 3, H, W), got shape {tuple(frames.shape)}")
        if self.is_random and rng is None:
            raise ValueError("a random video transform needs rng=random.Random(seed)")
        size = self.size
        if not self.train:
            x = resize_short_side(frames, size)
            crops = [x[..., t : t + size, w : w + size] for t, w in crop_boxes(*x.shape[-2:], size, self.num_crops)]
            return torch.stack([self._normalise(c) for c in crops])
        x = resize_short_side(frames, self.scale_size)
        h, w = x.shape[-2:]
        if self.augment == "standard":
            top, left, ch, cw = random_resized_crop_box(h, w, rrc_scale(size), rng)
            x = resize_frames(x[..., top : top + ch, left : left + cw], (size, size))
        else:
            top, left = (rng.randint(0, h - size), rng.randint(0, w - size)) if self.augment == "crop" else (
                (h - size) // 2, (w - size) // 2)  # fmt: skip
            x = x[..., top : top + size, left : left + size]
        if self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        return self._normalise(x)


# -- the dataset the loaders see ------------------------------------------------------------------------------


class VideoClips(Dataset):
    """``source[i]`` -> ``(clip, label)`` or ``None`` when the video cannot be read (reported once per video).

    Training: one clip ``(C, T, H, W)`` at a random offset. Testing: ``num_clips`` uniform clips x the
    transform's crops, stacked as views ``(V, C, T, H, W)``, V = ``num_clips * num_crops`` (clip-major). Keys
    are indices or the ``(index, seed)`` pairs of :class:`swinlab.data.SeededDistributedSampler`; ``limit``
    keeps the first N videos.
    """

    def __init__(
        self,
        source: VideoSource,
        transform: VideoTransform,
        clip_len: int,
        frame_interval: int = 1,
        num_clips: int = 1,
        limit: int | None = None,
    ) -> None:
        if min(clip_len, frame_interval, num_clips) < 1:
            raise ValueError(
                f"clip_len, frame_interval and num_clips must be >= 1, got {clip_len}, {frame_interval}, {num_clips}"
            )
        if limit is not None and limit < 1:
            raise ValueError(f"a sample limit must be >= 1, got {limit}")
        if transform.train and num_clips != 1:
            raise ValueError("training takes one clip per video (num_clips=1)")
        self.source, self.transform = source, transform
        self.clip_len, self.frame_interval, self.num_clips = clip_len, frame_interval, num_clips
        self.size = len(source) if limit is None else min(limit, len(source))
        self._reported: set[int] = set()

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (what an all-unreadable batch is given)."""
        clip = (3, self.clip_len, self.transform.size, self.transform.size)
        return clip if self.transform.train else (self.num_clips * self.transform.num_crops, *clip)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} videos")
        index %= self.size
        rng = None
        if self.transform.train:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        try:
            video = self.source.open(index)
            clips = sample_clips(video.num_frames, self.clip_len, self.frame_interval, self.num_clips, rng)
            order = sorted({i for clip in clips for i in clip})
            frames = video.read(order)
        except VideoReadError as e:
            if index not in self._reported:
                self._reported.add(index)
                warnings.warn(f"skipping unreadable video {e}", RuntimeWarning, stacklevel=2)
            return None
        position = {i: k for k, i in enumerate(order)}
        views = [self.transform(frames[[position[i] for i in clip]], rng) for clip in clips]
        label = self.source.label(index)
        return (views[0], label) if self.transform.train else (torch.cat(views), label)


# -- from a DataConfig ----------------------------------------------------------------------------------------

VIDEO_DATASETS = ("video", "motion_demo")
MOTION_DEMO_SIZES = (2048, 512)
"""Videos in the generated demo's train / val splits (``train_limit`` / ``val_limit`` take fewer)."""


def video_sets(cfg: DataConfig, seed: int) -> tuple[VideoClips, VideoClips]:
    """Train and val clip datasets for a video ``DataConfig`` (``data.name`` in :data:`VIDEO_DATASETS`)."""
    if cfg.name == "motion_demo":
        if cfg.hflip:
            raise ValueError("data.hflip must be false for motion_demo: a flip turns 'left' into 'right'")
        from swinlab.data.video_demo import MotionDemo

        train_src = MotionDemo("train", MOTION_DEMO_SIZES[0], seed, img_size=cfg.scale_size or cfg.img_size)
        val_src = MotionDemo("val", MOTION_DEMO_SIZES[1], seed, img_size=cfg.scale_size or cfg.img_size)
    elif cfg.name == "video":
        if cfg.train_list is None or cfg.val_list is None:
            raise ValueError("data.name=video needs data.train_list and data.val_list (annotation files)")
        root = Path(cfg.root).expanduser() if cfg.root is not None else None

        def listed(name: str) -> Path:
            path = Path(name).expanduser()
            return path if path.is_absolute() or root is None else root / path

        train_src = VideoList(listed(cfg.train_list), root)
        val_src = VideoList(listed(cfg.val_list), root, classes=train_src.classes)
    else:
        raise ValueError(f"not a video dataset: data.name={cfg.name!r} (video datasets: {', '.join(VIDEO_DATASETS)})")
    if cfg.in_chans not in (None, 3):
        raise ValueError(f"video clips are RGB: data.in_chans must be 3 or unset, got {cfg.in_chans}")
    stats = dict(mean=cfg.mean or KINETICS_MEAN, std=cfg.std or KINETICS_STD)
    size, scale = cfg.img_size, cfg.scale_size
    train_tf = VideoTransform(size, train=True, augment=cfg.augment, hflip=cfg.hflip, scale_size=scale, **stats)
    val_tf = VideoTransform(size, train=False, num_crops=cfg.test_crops, **stats)
    clip = dict(clip_len=cfg.clip_len, frame_interval=cfg.frame_interval)
    return (
        VideoClips(train_src, train_tf, **clip, limit=cfg.train_limit),
        VideoClips(val_src, val_tf, **clip, num_clips=cfg.test_clips, limit=cfg.val_limit),
    )
