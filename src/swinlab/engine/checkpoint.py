"""Training checkpoints: atomic writes and loads that say clearly what is wrong with a bad file.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over
the old one (``os.replace`` is atomic on POSIX and Windows) and the folder is fsync'ed so the rename itself
survives a crash: a run killed mid-write keeps its previous checkpoint. Everything stored is plain data
(tensors, numbers, strings, lists, dicts), so loading uses ``torch.load(weights_only=True)`` and runs no
pickled code.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

FORMAT = "swinlab-checkpoint"
VERSION = 2
"""2: optimizers by name, task state and frozen helpers' fingerprints, the task's own config section."""
REQUIRED_KEYS = ("model", "optimizers", "task", "frozen", "epoch", "step", "config", "history", "rng", "best")


TEMP_MARKER = ".tmp-"
"""Part of the name of a file an atomic write has not finished: ``.<name>.tmp-<pid>``."""


class CheckpointError(RuntimeError):
    """A file that is not a (readable) swinlab training checkpoint."""


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with the bytes ``write(file)`` produces, all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save a training state (see :data:`REQUIRED_KEYS`) to ``path``."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing {missing}")
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Atomically copy a checkpoint file (e.g. ``checkpoint.pt`` -> ``best.pt``)."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated/corrupt, or is some other kind of file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if isinstance(e, pickle.UnpicklingError):  # torch's weights-only refusal: long advice that does not apply
            reason = "no torch file of tensors and plain data (a pickle of other objects is never loaded)"
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason[:160]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a swinlab training checkpoint (no 'format': {FORMAT!r} entry); "
            "official/pretrained weights go through cfg.model.pretrained instead"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('version')!r}, this swinlab reads version {VERSION}"
            + (
                " (written by swinlab 0.1, whose config had no task section: start a new run folder, or evaluate it "
                "with swinlab 0.1)"
                if state.get("version") == 1
                else ""
            )
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {missing}")
    return state


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and Python RNG states as plain data (loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when it was saved and is available)."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
