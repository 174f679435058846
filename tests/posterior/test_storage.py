"""A posterior's stored forms (lightning_swag.posterior.storage): state dicts and files round-trip
exactly, and states of another posterior, other files and sharded posteriors are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag import SWAGPosterior
from lightning_swag.posterior.format import read_posterior_state
from lightning_swag.posterior.sharding import DDPSliceLayout
from lightning_swag.posterior.storage import (
    assign_state,
    read_file_state,
    refuse_sharded_state,
    state_layout,
    statistics_like,
)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def assert_same_posterior(a: SWAGPosterior, b: SWAGPosterior) -> None:
    assert a.param_shapes == b.param_shapes and a.num_snapshots == b.num_snapshots and a.rank == b.rank
    for name in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.sample(4, seed=3), b.sample(4, seed=3))


def test_state_dicts_and_files_round_trip_exactly(tmp_path: Path) -> None:
    post = random_walk_posterior(net())
    assert_same_posterior(SWAGPosterior.from_state_dict(post.state_dict()), post)
    post.save(tmp_path / "post.pt")
    assert_same_posterior(SWAGPosterior.load(tmp_path / "post.pt"), post)
    again = SWAGPosterior.from_model(net(), max_rank=4)
    again.load_state_dict(post.state_dict())
    assert_same_posterior(again, post)


def test_a_state_of_another_posterior_is_refused() -> None:
    post = random_walk_posterior(net())
    other = random_walk_posterior(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)))
    saved = read_posterior_state(other.state_dict())
    stats = statistics_like(post.num_params, post.statistics.max_rank, torch.float64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not match this posterior"):
        assign_state(stats, post.layout, post.param_shapes, saved)


def test_files_that_hold_no_posterior_are_named(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not a SWAG posterior"):
        read_file_state(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        read_file_state(tmp_path / "missing.pt")


def test_layouts_of_saved_states_and_sharded_states() -> None:
    post = random_walk_posterior(net())
    saved = read_posterior_state(post.state_dict())
    assert state_layout(saved, None, shard=False).shapes == dict(post.param_shapes)
    with pytest.raises(ValueError, match="has no parameters"):
        state_layout(saved, nn.Sequential(nn.Linear(3, 5)), shard=False)
    refuse_sharded_state(post.layout)  # whole: nothing to refuse
    with pytest.raises(ValueError, match="gather"):
        refuse_sharded_state(DDPSliceLayout.build(post.param_shapes, world_size=2, rank=0))
