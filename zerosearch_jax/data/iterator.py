"""Deterministic, epoch-aware, resumable iteration over training questions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zerosearch_jax.data.qa import QAExample, indices_by_source


class DataIterator:
    """Yields questions in a shuffled order that depends only on (seed, epoch).

    The position (epoch, index) is all a checkpoint needs to resume exactly where the run was;
    an epoch ends when fewer questions remain than a batch needs (those are skipped, as in a
    drop-last loader), and the next epoch starts with a fresh permutation.

    With `stratify`, an epoch interleaves the data sources (each in its own shuffled order:
    one of each source in turn, sorted by name), so every batch of a multiple of the number of
    sources holds each source equally, e.g. half single-hop, half two-hop questions where the
    training split is one third two-hop. The epoch stops when its smallest source is used up;
    the larger ones' remaining questions come in later epochs' permutations.
    """

    def __init__(self, examples: Sequence[QAExample], seed: int, epoch: int = 0, index: int = 0,
                 stratify: bool = False):
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = epoch
        self.index = index
        # Positions of each source's questions; one "source" (all of them) without stratify.
        groups = indices_by_source(self.examples) if stratify else {"": range(len(examples))}
        self.sources = [np.asarray(groups[s]) for s in sorted(groups)]
        self.per_source = min(len(s) for s in self.sources)
        self.epoch_size = len(self.sources) * self.per_source

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        # [per_source, sources] read row by row: one question of each source in turn (with one
        # source, the plain permutation).
        return np.stack([rng.permutation(s)[:self.per_source] for s in self.sources],
                        axis=1).reshape(-1)

    def next_batch(self, n: int) -> list[QAExample]:
        if n > self.epoch_size:
            strata = (f" ({len(self.sources)} sources of at least {self.per_source} each, "
                      "stratified)") if len(self.sources) > 1 else ""
            raise ValueError(f"a batch of {n} questions needs at least {n} examples, "
                             f"got {self.epoch_size}{strata}")
        if self.index + n > self.epoch_size:
            self.epoch += 1
            self.index = 0
        order = self._order(self.epoch)[self.index:self.index + n]
        self.index += n
        return [self.examples[i] for i in order]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
