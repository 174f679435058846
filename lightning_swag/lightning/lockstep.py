"""Keeping processes in step when every forward pass of a prediction run is a collective.

Under FSDP2 every forward all-gathers parameters, and a DDP slice that does not fit the sample cache
joins its samples' columns at every batch. Lightning's prediction sampler may give processes
different numbers of batches; a process that stops early would leave the others waiting forever.
:class:`Lockstep` counts each process's batches, and at the end of the run the processes that ran
fewer repeat their last batch (the result is dropped) until all ran the same number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["Lockstep"]


class Lockstep:
    """The batch count of one run (see the module docstring)."""

    def __init__(self) -> None:
        self.active = False
        self.target = 0
        self.done = 0
        self.last: Any = None

    def start(self, active: bool, my_batches: float, reduce_max: Callable[[float], float]) -> bool:
        """Begin a run; ``reduce_max`` is a collective giving the largest batch count of all processes.

        Returns False, leaving the processes unsynchronised, when a process cannot count its batches
        (a dataloader without a length): the caller warns.
        """
        self.active, self.target, self.done, self.last = active, 0, 0, None
        if not active:
            return True
        most = reduce_max(my_batches)
        if not math.isfinite(most):
            self.active = False
            return False
        self.target = int(most)
        return True

    def record(self, inputs: Any) -> None:
        """One batch was run on ``inputs``."""
        if self.active:
            self.done, self.last = self.done + 1, inputs

    def finish(self, run: Callable[[Any], Any], rank: int) -> None:
        """Repeat the last batch with ``run`` until this process ran as many batches as the most busy one."""
        if not self.active:
            return
        missing = self.target - self.done
        if missing > 0 and self.last is None:
            raise RuntimeError(
                f"SWAGModule: process {rank} had no batch while others had {self.target}; with a sharded "
                "posterior every process needs at least one batch."
            )
        last = self.last
        self.active = False  # the repeats are not counted
        for _ in range(missing):
            run(last)
