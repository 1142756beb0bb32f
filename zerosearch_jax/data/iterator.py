"""Deterministic, epoch-aware, resumable iteration over training questions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zerosearch_jax.data.qa import QAExample


class DataIterator:
    """Yields questions in a shuffled order that depends only on (seed, epoch).

    The position (epoch, index) is all a checkpoint needs to resume exactly where the run was;
    an epoch ends when fewer questions remain than a batch needs (those are skipped, as in a
    drop-last loader), and the next epoch starts with a fresh permutation.
    """

    def __init__(self, examples: Sequence[QAExample], seed: int, epoch: int = 0, index: int = 0):
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = epoch
        self.index = index

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def next_batch(self, n: int) -> list[QAExample]:
        if n > len(self.examples):
            raise ValueError(f"a batch of {n} questions needs at least {n} examples, "
                             f"got {len(self.examples)}")
        if self.index + n > len(self.examples):
            self.epoch += 1
            self.index = 0
        order = self._order(self.epoch)[self.index:self.index + n]
        self.index += n
        return [self.examples[i] for i in order]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
