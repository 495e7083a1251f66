"""A bounded memory of past training examples, filled by reservoir sampling (shared by replay and agem).

Reservoir sampling (Vitter's algorithm R): after n examples have streamed past a memory of capacity k, each of
them is in the memory with probability min(1, k / n), whatever the order or the task they came from. Methods
that keep such a memory store old examples: they are not data-free (METHODS.md, replay and A-GEM).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

from loracl.data.text import Encoded


class ReservoirMemory:
    """At most `capacity` tokenized examples, each labelled with the task it came from."""

    def __init__(self, capacity: int, seed: int | str) -> None:
        if capacity < 1:
            raise ValueError("the memory needs a capacity of at least one example")
        self.capacity = capacity
        self.items: list[Encoded] = []
        self.sources: list[str] = []  # the task of each item
        self.seen = 0  # examples offered so far
        self._keep = random.Random(f"{seed}:reservoir")  # which examples are kept
        self._draw = random.Random(f"{seed}:draw")  # which are drawn for a batch

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Encoded, source: str) -> None:
        """Offer one example: kept outright while there is room, else it replaces a random slot with
        probability capacity / seen (algorithm R)."""
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            self.sources.append(source)
            return
        slot = self._keep.randrange(self.seen)
        if slot < self.capacity:
            self.items[slot] = item
            self.sources[slot] = source

    def extend(self, items: Iterable[Encoded], source: str) -> None:
        for item in items:
            self.add(item, source)

    def sample(self, count: int) -> list[Encoded]:
        """`count` distinct stored examples drawn at random (all of them when fewer are stored)."""
        return self._draw.sample(self.items, min(count, len(self.items)))

    def composition(self) -> dict[str, int]:
        """How many stored examples come from each task."""
        return dict(Counter(self.sources))

    def tokens(self) -> int:
        return sum(len(item.input_ids) for item in self.items)

    def nbytes(self) -> int:
        """Bytes of the stored token ids, counted as the int64 tensors they become in a batch."""
        return 8 * self.tokens()

    def summary(self) -> dict[str, int | str]:
        """What a run reports about the memory (results.json `method_info`)."""
        by_task = ", ".join(f"{task}: {n}" for task, n in self.composition().items())
        return {
            "memory_size": self.capacity,
            "memory_stored": len(self.items),
            "memory_by_task": by_task or "empty",
            "examples_seen": self.seen,
        }

