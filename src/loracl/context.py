"""What a method sees of the task at hand: its examples, tokenized, and a way to batch them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Task
from .text import Encoded
from .training import collate


@dataclass
class TaskContext:
    index: int  # 1-based position in the sequence
    task: Task
    task_dir: Path  # the run's tasks/<i>-<task>/ folder, for per-task artefacts
    encoded: list[Encoded]  # the task's training examples, tokenized
    pad_id: int
    device: torch.device
    batch_size: int
    seed: int

    def sample(self, max_examples: int | None) -> list[Encoded]:
        """A deterministic subset of the training examples (all when max_examples is None)."""
        if max_examples is None or max_examples >= len(self.encoded):
            return list(self.encoded)
        rng = random.Random(f"{self.seed}:{self.task.name}:sample")
        return [self.encoded[i] for i in sorted(rng.sample(range(len(self.encoded)), max_examples))]

    def batches(self, max_examples: int | None = None, batch_size: int | None = None) -> Iterator[dict]:
        """Batches over `sample(max_examples)`, for statistics that methods collect (bases, Fisher, ...)."""
        examples = self.sample(max_examples)
        size = batch_size or self.batch_size
        for start in range(0, len(examples), size):
            yield collate(examples[start : start + size], self.pad_id, self.device)
