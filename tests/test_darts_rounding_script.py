"""benchmarks/darts_rounding.py: its two comparisons of search runs, on run folders written the way the search task
writes them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import darts_rounding


def _write_genotype(run: Path, epoch: int, normal: list, reduce: list) -> None:
    run.mkdir(parents=True, exist_ok=True)
    genotype = {"kind": "darts", "normal": normal, "normal_concat": [2, 3, 4, 5], "reduce": reduce,
                "reduce_concat": [2, 3, 4, 5]}  # fmt: skip
    (run / f"genotype_epoch{epoch}.json").write_text(json.dumps(genotype))


def test_differing_entries_counts_operation_or_input_changes(tmp_path):
    normal = [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["dil_conv_3x3", 0], ["max_pool_3x3", 2]]
    reduce = [["avg_pool_3x3", 0], ["avg_pool_3x3", 1], ["sep_conv_5x5", 2], ["skip_connect", 1]]
    _write_genotype(tmp_path / "a", 1, normal, reduce)
    other_normal = [["sep_conv_3x3", 1], *normal[1:]]  # another input
    other_reduce = [*reduce[:3], ["dil_conv_5x5", 1]]  # another operation
    _write_genotype(tmp_path / "b", 1, other_normal, other_reduce)
    assert darts_rounding.differing_entries(tmp_path / "a", tmp_path / "a", 1) == 0
    assert darts_rounding.differing_entries(tmp_path / "a", tmp_path / "b", 1) == 2


def test_largest_alpha_difference_looks_at_both_cells():
    a = {"normal": [[0.5, 0.5], [0.25, 0.75]], "reduce": [[0.1, 0.9]]}
    b = {"normal": [[0.5, 0.5], [0.25, 0.75]], "reduce": [[0.4, 0.6]]}
    assert darts_rounding.largest_alpha_difference(a, a) == 0.0
    assert abs(darts_rounding.largest_alpha_difference(a, b) - 0.3) < 1e-12
