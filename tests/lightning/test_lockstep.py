"""Lockstep: a process with fewer batches repeats its last one until all processes ran as many."""

from __future__ import annotations

import math

import pytest

from lightning_swag.lightning.lockstep import Lockstep


def test_the_short_process_repeats_its_last_batch_up_to_the_longest() -> None:
    lockstep, seen, told = Lockstep(), [], []
    assert lockstep.start(True, 3, lambda mine: told.append(mine) or 5.0)
    assert told == [3] and lockstep.target == 5
    for batch in ("a", "b", "c"):
        lockstep.record(batch)
    lockstep.finish(lambda inputs: (seen.append(inputs), lockstep.record(inputs)), rank=1)
    assert seen == ["c", "c"]
    assert lockstep.done == 3 and not lockstep.active  # the repeats are not counted


def test_the_longest_process_repeats_nothing_and_an_inactive_run_is_not_counted() -> None:
    lockstep, seen = Lockstep(), []
    lockstep.start(True, 4, lambda mine: mine)
    for batch in range(4):
        lockstep.record(batch)
    lockstep.finish(seen.append, rank=0)
    assert seen == []
    assert lockstep.start(False, 2, lambda mine: pytest.fail("no collective when inactive"))
    lockstep.record("x")
    lockstep.finish(seen.append, rank=0)
    assert seen == [] and lockstep.done == 0 and lockstep.last is None


def test_a_process_that_cannot_count_its_batches_leaves_the_run_unsynchronised() -> None:
    lockstep, seen = Lockstep(), []
    assert not lockstep.start(True, math.inf, lambda mine: mine)
    assert not lockstep.active
    lockstep.record("x")
    lockstep.finish(seen.append, rank=0)
    assert seen == []


def test_a_process_without_any_batch_is_an_error_naming_it() -> None:
    lockstep = Lockstep()
    lockstep.start(True, 0, lambda mine: 2.0)
    with pytest.raises(RuntimeError, match="process 3 had no batch while others had 2"):
        lockstep.finish(lambda inputs: None, rank=3)


def test_start_forgets_the_previous_run() -> None:
    lockstep = Lockstep()
    lockstep.start(True, 2, lambda mine: 2.0)
    lockstep.record("old")
    lockstep.start(True, 1, lambda mine: 1.0)
    assert (lockstep.done, lockstep.last, lockstep.target) == (0, None, 1)
