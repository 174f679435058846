"""``SWAGCallback``'s state in checkpoints: the posterior and the bookkeeping round-trip, mismatches warn."""

from __future__ import annotations

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag.lightning.callback_state import (
    CollectionState,
    load_distributed_part,
    read_state,
    save_sharded_posterior,
    state_dict,
)
from lightning_swag.lightning.swa_lr import SWALRSchedule


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _collected(max_rank: int = 3) -> CollectionState:
    post = random_walk_posterior(_net(), snapshots=6, max_rank=max_rank)
    return CollectionState(posterior=post, last_epoch=4, last_step=40, snapshot_step=39)


def test_the_posterior_and_the_bookkeeping_round_trip() -> None:
    saved_from = _collected()
    saved = state_dict(saved_from, None)
    assert saved["last_epoch"] == 4 and saved["last_step"] == 40
    assert saved["tracked"] == saved_from.posterior.param_names
    restored = CollectionState()
    read_state(saved, restored, max_rank=3, shards=False, swa_lr=None)
    post, original = restored.posterior, saved_from.posterior
    assert post is not None and post is not original and post.num_snapshots == 6
    torch.testing.assert_close(post.mean, original.mean, rtol=0, atol=0)
    torch.testing.assert_close(post.variance, original.variance, rtol=0, atol=0)
    torch.testing.assert_close(post.deviations, original.deviations, rtol=0, atol=0)
    assert (restored.last_epoch, restored.last_step) == (4, 40)
    assert restored.snapshot_step == -1 and restored.pending is None  # no snapshot taken in this run yet


def test_the_swalr_states_go_with_the_callbacks() -> None:
    trainer_lr = [{"anneal_epochs": 3, "_step_count": 2}]
    schedule = SWALRSchedule(0.1, 3, "cos")
    schedule.load_state_dict(trainer_lr)
    saved = state_dict(CollectionState(), schedule)
    assert saved["swa_schedulers"] == trainer_lr
    restored = SWALRSchedule(0.1, 3, "cos")
    read_state(saved, CollectionState(), max_rank=3, shards=False, swa_lr=restored)
    assert restored.state_dict() == trainer_lr and not restored.installed


def test_a_state_without_posterior_and_an_old_state_without_fields() -> None:
    saved = state_dict(CollectionState(), None)
    assert saved["tracked"] is None and saved["swa_schedulers"] == []
    restored = _collected()
    read_state(saved, restored, max_rank=3, shards=False, swa_lr=None)
    assert restored.posterior is None
    old = CollectionState()
    read_state({}, old, max_rank=3, shards=False, swa_lr=None)
    assert (old.posterior, old.last_epoch, old.last_step) == (None, -1, 0)


def test_a_whole_posterior_waits_for_the_model_when_the_callback_shards() -> None:
    saved = state_dict(_collected(), None)
    restored = CollectionState()
    read_state(saved, restored, max_rank=3, shards=True, swa_lr=None)
    assert restored.posterior is None and restored.pending is saved["posterior"]


def test_a_different_max_rank_warns_and_keeps_the_checkpoints() -> None:
    saved = state_dict(_collected(max_rank=3), None)
    restored = CollectionState()
    with pytest.warns(UserWarning, match="max_rank=3 but the callback was built with max_rank=5"):
        read_state(saved, restored, max_rank=5, shards=False, swa_lr=None)
    assert restored.posterior is not None and restored.posterior.max_rank == 3


def test_checkpoints_without_distributed_parts() -> None:
    model, device = _net(), torch.device("cpu")
    with pytest.warns(UserWarning, match="the checkpoint holds no SWAG state"):
        assert load_distributed_part({"callbacks": {}}, "SWAGCallback", None, model, device) is None
    whole = {"callbacks": {"SWAGCallback": state_dict(_collected(), None)}}
    assert load_distributed_part(whole, "SWAGCallback", None, model, device) is None
    checkpoint = {"callbacks": {"SWAGCallback": {"last_epoch": 1}}, "state_dict": {}}
    save_sharded_posterior(_collected().posterior, checkpoint, "SWAGCallback")  # unsharded: nothing to add
    save_sharded_posterior(None, checkpoint, "SWAGCallback")
    assert checkpoint == {"callbacks": {"SWAGCallback": {"last_epoch": 1}}, "state_dict": {}}
