"""Seeds, and the one seeded, checkpointed epoch stream every job reads its data from.

Every random choice of a run is derived from (seed, what it is for, step, ...) rather
than drawn from a shared generator, so a resumed run, the in-process run and the Ray
run all make the same choices. The stream is the data order: epoch e is a shuffle of
range(size) seeded by (seed, "epoch", e), and the stream reads the epochs one after
another, so its whole state is one position (what a checkpoint stores).
"""

from __future__ import annotations

import random
from array import array


def derive_seed(*parts) -> int:
    """A seed for one random choice, from the run's seed and what names the choice."""
    return random.Random(":".join(map(str, parts))).randrange(2**31)


class EpochStream:
    """Indices into `size` items in seeded epoch orders, read as one stream: a read may
    cross into the next epoch, and a job may read a varying number per step (RL's
    dynamic sampling)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.position = size, seed, 0
        self._order: tuple[int, array] | None = None

    def order(self, epoch: int) -> array:
        """The shuffle of epoch `epoch` (only the latest is kept: reads move forward)."""
        if self._order is None or self._order[0] != epoch:
            # 4 bytes an index, not a list's ~36 (a pointer and an int object each): a
            # million-prompt epoch holds 4 MB. Random.shuffle swaps in place through
            # indexing, so an array gets the very order a list of range(size) got.
            order = array("i" if self.size < 2**31 else "q", range(self.size))
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def take(self, count: int) -> list[int]:
        """The next `count` indices."""
        start, self.position = self.position, self.position + count
        return [
            self.order(epoch)[i]
            for epoch, i in (divmod(pos, self.size) for pos in range(start, start + count))
        ]
