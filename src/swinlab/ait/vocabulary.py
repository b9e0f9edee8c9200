"""The task-solver's shared vocabulary: one id space for every task's output tokens (AiT §3.2), so one embedding
table and one tied classifier serve depth, instance masks and boxes alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch

__all__ = ["Vocabulary"]


class Vocabulary:
    """Named, non-overlapping half-open id ranges ``name -> (start, stop)``.

    ``tasks`` names the ranges that hold a tokenizer's codes (code ``k`` of task ``t`` is id ``start_t + k``).
    The layout is checked on construction: empty or negative ranges, overlaps (both names given) and unknown
    task names are errors. :meth:`official` builds AiT's layout.
    """

    def __init__(self, ranges: Mapping[str, tuple[int, int]], tasks: Sequence[str] = ()) -> None:
        spans = {name: (int(start), int(stop)) for name, (start, stop) in ranges.items()}
        for name, (start, stop) in spans.items():
            if start < 0 or stop <= start:
                raise ValueError(f"vocabulary range {name!r} = [{start}, {stop}) is empty or negative")
        ordered = sorted(spans.items(), key=lambda item: item[1])
        for (name_a, (_, stop_a)), (name_b, (start_b, stop_b)) in pairwise(ordered):
            if start_b < stop_a:
                raise ValueError(
                    f"vocabulary ranges {name_a!r} = [{spans[name_a][0]}, {stop_a}) and {name_b!r} = "
                    f"[{start_b}, {stop_b}) overlap"
                )
        unknown = [t for t in tasks if t not in spans]
        if unknown:
            raise ValueError(f"task code ranges {unknown} are not in the vocabulary layout {list(spans)}")
        self.ranges = dict(ordered)
        self.tasks = tuple(tasks)
        self.size = max(stop for _, stop in spans.values())

    @classmethod
    def official(
        cls, num_bins: int = 2000, num_classes: int = 80, codes: Mapping[str, int] | None = None
    ) -> Vocabulary:
        """AiT's layout: ``num_bins + 1`` coordinate bins, the classes, one special id, the noise class, then each
        task's codes in order (official default: 128 mask codes, 128 depth codes -> 2339 ids)."""
        codes = {"mask": 128, "depth": 128} if codes is None else dict(codes)
        ranges = {"bins": (0, num_bins + 1)}
        ranges["classes"] = (num_bins + 1, num_bins + 1 + num_classes)
        ranges["special"] = (ranges["classes"][1], ranges["classes"][1] + 1)
        ranges["noise"] = (ranges["special"][1], ranges["special"][1] + 1)
        start = ranges["noise"][1]
        for task, count in codes.items():
            ranges[task] = (start, start + count)
            start += count
        return cls(ranges, tasks=tuple(codes))

    def span(self, name: str) -> tuple[int, int]:
        """``(start, stop)`` of a range."""
        if name not in self.ranges:
            raise KeyError(f"no vocabulary range {name!r}; layout: {list(self.ranges)}")
        return self.ranges[name]

    def num_codes(self, task: str) -> int:
        start, stop = self.task_span(task)
        return stop - start

    def task_span(self, task: str) -> tuple[int, int]:
        """``(start, stop)`` of a task's code range."""
        if task not in self.tasks:
            raise KeyError(f"{task!r} is not a task with codes in this vocabulary; tasks: {list(self.tasks)}")
        return self.ranges[task]

    def from_codes(self, task: str, codes: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of a task's tokenizer codes (checked to lie in ``[0, num_codes)``)."""
        start, stop = self.task_span(task)
        if codes.numel() and (codes.min() < 0 or codes.max() >= stop - start):
            raise ValueError(
                f"{task} codes must lie in [0, {stop - start}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes.long() + start

    def to_codes(self, task: str, ids: torch.Tensor) -> torch.Tensor:
        """A task's codes of vocabulary ids; an id outside the task's range is an error naming both."""
        self.check_ids(task, ids)
        return ids.long() - self.task_span(task)[0]

    def check_ids(self, task: str, ids: torch.Tensor, ignore_index: int | None = None) -> None:
        """Every id (but ``ignore_index``) lies in ``task``'s code range, or a ``ValueError`` naming id and range."""
        start, stop = self.task_span(task)
        kept = ids if ignore_index is None else ids[ids != ignore_index]
        outside = (kept < start) | (kept >= stop)
        if outside.any():
            bad = int(kept[outside][0])
            raise ValueError(f"token id {bad} lies outside task {task!r}'s code range [{start}, {stop})")

    def __repr__(self) -> str:
        body = ", ".join(f"{name}=[{a}, {b})" for name, (a, b) in self.ranges.items())
        return f"Vocabulary({body}; tasks={list(self.tasks)})"
