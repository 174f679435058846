"""The file format (lightning_swag.posterior.format): versions, upgrades, checks and the callback state."""

from __future__ import annotations

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.posterior.format import (
    FORMAT_VERSION,
    MODULE_POSTERIORS_KEY,
    callback_state,
    has_snapshots,
    read_callback_state,
    read_posterior_state,
)


def _snapshots(count: int = 5, size: int = 6) -> torch.Tensor:
    return torch.randn(count, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_a_format_1_state_is_upgraded_to_the_sum_of_squared_deviations() -> None:
    thetas = _snapshots()
    n = thetas.shape[0]
    old = {
        "format_version": 1,
        "param_shapes": {"w": [6]},
        "max_rank": 2,
        "num_snapshots": n,
        "mean": thetas.mean(0),
        "sq_mean": thetas.square().mean(0),  # format 1 kept E[θ²]
        "deviations": torch.zeros(2, 6),
    }
    state = read_posterior_state(old, source="old.pt")
    assert FORMAT_VERSION == 2
    expected = ((thetas - thetas.mean(0)) ** 2).sum(0)  # M₂ from the snapshots themselves
    torch.testing.assert_close(state.sum_sq_dev, expected, rtol=1e-10, atol=1e-12)
    assert state.num_snapshots == n and state.param_shapes == {"w": torch.Size([6])}


def test_an_unknown_version_is_refused_naming_the_field_and_the_source() -> None:
    state = random_walk_posterior(nn.Linear(2, 2), snapshots=2).state_dict()
    state["format_version"] = 99
    with pytest.raises(ValueError, match=r"format_version.*99.*future.pt|future.pt.*format_version.*99"):
        read_posterior_state(state, source="future.pt")


def test_the_callback_state_round_trips_and_older_states_get_defaults() -> None:
    saved = callback_state(None, last_epoch=3, last_step=40, swa_schedulers=[{"x": 1}], tracked=["w"])
    read = read_callback_state(saved)
    assert (read.last_epoch, read.last_step, read.swa_schedulers, read.tracked) == (3, 40, [{"x": 1}], ["w"])
    older = read_callback_state({"posterior": None})  # a checkpoint written before these fields
    assert (older.last_epoch, older.last_step, older.swa_schedulers, older.tracked) == (-1, 0, [], None)


def test_has_snapshots_reads_module_and_callback_checkpoints() -> None:
    post = random_walk_posterior(nn.Linear(2, 2), snapshots=3)
    assert has_snapshots({MODULE_POSTERIORS_KEY: [post.state_dict()]})
    assert has_snapshots({"callbacks": {"SWAGCallback": callback_state(post.state_dict(), 0, 0, [], None)}})
    assert not has_snapshots({"callbacks": {"SWAGCallback": callback_state(None, 0, 0, [], None)}})


def test_a_nested_swag_module_keeps_its_posterior_in_the_parent_state_dict() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    post = random_walk_posterior(net, snapshots=4)
    parent = nn.ModuleDict({"bma": SWAGModule(net, post, num_samples=2)})
    state = parent.state_dict()
    fresh = nn.ModuleDict({"bma": SWAGModule(nn.Linear(3, 2))})
    fresh.load_state_dict(state)
    restored: SWAGPosterior = fresh["bma"].posterior
    assert restored.num_snapshots == 4
    torch.testing.assert_close(restored.mean, post.mean, rtol=0, atol=0)
    torch.testing.assert_close(restored.deviations, post.deviations, rtol=0, atol=0)
