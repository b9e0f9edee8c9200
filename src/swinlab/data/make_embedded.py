"""Rebuild the embedded Fashion-MNIST subset: ``python -m swinlab.data.make_embedded --source DIR``.

Selection: the first ``--train-per-class`` / ``--test-per-class`` images of each class in file order. They are
stored interleaved (class 0, 1, ..., 9, 0, 1, ...), so any first-N prefix (``data.train_limit``) stays
class-balanced. Output is IDX gzip with mtime 0: rerunning on the same source gives byte-identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from swinlab.data.idx import FashionMNIST, write_idx


def balanced_interleaved(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class, ordered round-robin over the classes."""
    picks = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} samples, {per_class} requested")
        picks.append(idx)
    return np.stack(picks, axis=1).reshape(-1)


def make_subset(source: Path, out: Path, train_per_class: int, test_per_class: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for train, prefix, per_class in ((True, "train", train_per_class), (False, "t10k", test_per_class)):
        ds = FashionMNIST(source, train=train)
        order = balanced_interleaved(ds.labels, per_class, len(ds.classes))
        for kind, array in (("images-idx3", ds.images[order, 0].numpy()), ("labels-idx1", ds.labels[order])):
            path = out / f"{prefix}-{kind}-ubyte.gz"
            write_idx(path, array.astype(np.uint8))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swinlab.data.make_embedded", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="folder with the full Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "embedded")
    parser.add_argument("--train-per-class", type=int, default=1200)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args(argv)
    for path in make_subset(args.source, args.out, args.train_per_class, args.test_per_class):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
