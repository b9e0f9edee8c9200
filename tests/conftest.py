"""Shared test set-up: one torch thread (small ops under contention are ~100x slower with two)."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# The shared folder sits beside the checkout; SWINLAB_GOLDEN points elsewhere (e.g. a clone in /tmp).
GOLDEN = Path(os.environ.get("SWINLAB_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN} (they live in the shared/ folder beside the checkout)")
    return GOLDEN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
