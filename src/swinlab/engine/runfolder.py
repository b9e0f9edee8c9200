"""A run folder belongs to one run: an exclusive lock while it trains, and resume only of the same recipe.

Without these, two ``swinlab train`` processes on one ``output_dir`` interleave their metrics.csv rows and
overwrite each other's checkpoints, and a later run silently continues another run's weights with its own seed and
learning rate. The lock is an ``flock`` on ``<run>/.lock``: the kernel drops it when the holder dies (even by
SIGKILL), so a crashed run never leaves the folder locked; the file records who holds it for the error message.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from swinlab.engine.checkpoint import TEMP_MARKER

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; runs are then not protected from each other
    fcntl = None

RUN_CONTROL_KEYS = frozenset({
    "epochs", "resume", "eval_every", "tensorboard", "log_every", "threads", "device", "output_dir",
    "reuse_cpu_memory", "compile", "max_skipped_fraction", "data.num_workers", "data.eval_batch_size",
})  # fmt: skip
"""Keys that say how a run is carried out, not what it trains: they may change when it is resumed."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (held by another run, or a checkpoint of another recipe)."""


@contextlib.contextmanager
def lock_run_folder(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process; another holder makes it fail at once, naming that holder."""
    require_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = run_dir / ".lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RunFolderError(
                f"run folder {run_dir} is in use by another run ({_holder(handle.read())}); wait for it to finish "
                "or write elsewhere with --set output_dir=..."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output_dir {run_dir} is a file, not a folder: choose another --set output_dir=...")


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']}, since {started}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete what atomic writes of a killed run left half-written (call it while holding the lock: then no other
    process can be writing them)."""
    stale = [p for p in run_dir.glob(f".*{TEMP_MARKER}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key != "kwargs":  # model.kwargs is one value: a constructor's arguments
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys (outside :data:`RUN_CONTROL_KEYS`) whose values differ between two configs, as ``key: a -> b``."""
    before, now = _flatten(recorded), _flatten(current)
    keys = sorted((before.keys() | now.keys()) - RUN_CONTROL_KEYS)
    missing = object()
    return [
        f"{key}: {before.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        for key in keys
        if before.get(key, missing) != now.get(key, missing)
    ]
