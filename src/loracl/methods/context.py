"""What a method sees of the task at hand: its examples, tokenized, and a way to batch them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loracl.data import Task
from loracl.data.text import Encoded
from loracl.engine import distributed
from loracl.engine.training import collate


@dataclass
class TaskContext:
    index: int  # 1-based position in the sequence (after an init adapter, the method's task 1: from 2)
    task: Task
    task_dir: Path  # the run's tasks/<i>-<task>/ folder, for per-task artefacts
    encoded: list[Encoded]  # the task's training examples, tokenized
    pad_id: int
    device: torch.device
    batch_size: int
    seed: int
    lockstep: bool = False  # the model's weights are sharded: every process runs as many passes (FSDP)

    def sample(self, max_examples: int | None) -> list[Encoded]:
        """A deterministic subset of the training examples (all when max_examples is None)."""
        if max_examples is None or max_examples >= len(self.encoded):
            return list(self.encoded)
        rng = random.Random(f"{self.seed}:{self.task.name}:sample")
        return [self.encoded[i] for i in sorted(rng.sample(range(len(self.encoded)), max_examples))]

    def batches(self, max_examples: int | None = None, batch_size: int | None = None) -> Iterator[dict]:
        """Batches over `sample(max_examples)`, for statistics that methods collect (bases, Fisher, ...).

        With several processes each gets its share of the batches: a method sums what it accumulates over
        them with `all_reduce` before using it (an SVD, a QR, a Fisher), so every process ends with the
        statistics of all the batches, as one process would.

        With `lockstep` (a sharded model) a process whose share is smaller also gets padding batches (one
        real example each) at the end, yielded inside `distributed.padding()`: run the same passes on them
        (forward, and backward if the others take one) but count nothing (`distributed.padding_pass()`).
        Consume the batches one at a time, as they come: the flag holds only until the next one is asked."""
        examples = self.sample(max_examples)
        size = batch_size or self.batch_size
        starts = range(0, len(examples), size)
        for start in distributed.shard(starts):
            yield collate(examples[start : start + size], self.pad_id, self.device)
        for _ in range(distributed.padding_count(len(starts)) if self.lockstep else 0):
            with distributed.padding():
                yield collate(examples[:1], self.pad_id, self.device)

    @staticmethod
    def all_reduce(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum per-process statistics (keyed tensors of the same shapes everywhere) over processes."""
        return distributed.all_reduce_dict_(tensors)

    @staticmethod
    def all_reduce_count(count: int) -> int:
        return round(distributed.sum_scalar(float(count)))
