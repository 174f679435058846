"""SWAGPosterior: moments, ring buffer, sampling and serialization against independent computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import expected_moments, flat_params
from torch import nn

from lightning_swag import SWAGPosterior


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _random_walk(net: nn.Module, post: SWAGPosterior, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    recorded = []
    for _ in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        post.collect(net)
        recorded.append(flat_params(net).double())
    return recorded


@pytest.mark.parametrize("steps,max_rank", [(1, 5), (3, 5), (5, 5), (12, 5), (7, 3), (4, 0)])
def test_moments_and_deviation_rows_match_recorded_snapshots(steps: int, max_rank: int) -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=max_rank)
    recorded = _random_walk(net, post, steps)
    mean, var, rows = expected_moments(recorded, max_rank)
    assert post.num_snapshots == steps
    assert post.rank == min(steps, max_rank)
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(post.variance, var, rtol=1e-9, atol=1e-12)
    assert post.deviations.shape == (min(steps, max_rank), post.num_params)
    torch.testing.assert_close(post.deviations.double(), rows, rtol=1e-5, atol=1e-6)


def test_tracks_trainable_parameters_in_parameters_order_by_name() -> None:
    net = _net()
    net[0].bias.requires_grad_(False)
    post = SWAGPosterior.from_model(net)
    assert post.param_names == ["0.weight", "2.weight", "2.bias"]
    assert post.num_params == 12 + 8 + 2
    post.collect(net)
    torch.testing.assert_close(post.mean.float(), flat_params(net))


def test_include_patterns_select_a_subset() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, include=["2"])
    assert post.param_names == ["2.weight", "2.bias"]
    assert SWAGPosterior.from_model(net, include="*.bias").param_names == ["0.bias", "2.bias"]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        SWAGPosterior.from_model(net, include=["head.*"])


def test_variance_is_never_negative_for_constant_weights() -> None:
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.1)  # 0.1 is not exact in binary: E[θ²] − E[θ]² may round below 0
    post = SWAGPosterior.from_model(net, max_rank=2, moment_dtype=torch.float32)
    for _ in range(9):
        post.collect(net)
    assert (post.variance >= 0).all()
    assert post.variance.max() < 1e-6


def test_deviation_buffer_is_allocated_once() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    ptr = post._deviations.data_ptr()
    _random_walk(net, post, 10)
    assert post._deviations.data_ptr() == ptr


def test_sample_covariance_matches_formula() -> None:
    net = nn.Linear(2, 2)  # P = 6
    post = SWAGPosterior.from_model(net, max_rank=4)
    _random_walk(net, post, 9, seed=3)
    k = post.rank
    dev = post.deviations.double()
    scale = 0.5
    expected_cov = scale * (torch.diag(post.variance) + dev.T @ dev / (k - 1))
    g = torch.Generator().manual_seed(0)
    samples = post.sample(400_000, scale=scale, generator=g)
    centered = samples - post.mean
    cov = centered.T @ centered / samples.shape[0]
    tol = 0.02 * expected_cov.diag().max().item()
    torch.testing.assert_close(samples.mean(0), post.mean, rtol=0, atol=tol)
    torch.testing.assert_close(cov, expected_cov, rtol=0, atol=tol)


@pytest.mark.parametrize("mode", ["max_rank_0", "diagonal_only"])
def test_diagonal_mode_has_diagonal_covariance(mode: str) -> None:
    net = nn.Linear(2, 2)
    post = SWAGPosterior.from_model(net, max_rank=0 if mode == "max_rank_0" else 4)
    _random_walk(net, post, 6, seed=4)
    g = torch.Generator().manual_seed(0)
    samples = post.sample(300_000, scale=0.3, generator=g, diagonal_only=mode == "diagonal_only")
    centered = samples - post.mean
    cov = centered.T @ centered / samples.shape[0]
    expected = 0.3 * torch.diag(post.variance)
    torch.testing.assert_close(cov, expected, rtol=0, atol=0.02 * expected.max().item())


def test_rank_one_uses_diagonal_only() -> None:
    net = nn.Linear(2, 1)
    post = SWAGPosterior.from_model(net, max_rank=5)
    _random_walk(net, post, 1)
    samples = post.sample(10, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()  # no division by k - 1 = 0


def test_sampling_is_reproducible_and_leaves_global_rng_alone() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    _random_walk(net, post, 5)
    state = torch.get_rng_state()
    a = post.sample(4, generator=torch.Generator().manual_seed(7))
    b = post.sample(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, post.sample(4, generator=torch.Generator().manual_seed(8)))


def test_scale_zero_returns_the_mean() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    _random_walk(net, post, 5)
    samples = post.sample(3, scale=0.0)
    assert torch.equal(samples, post.mean.expand(3, -1))


def test_state_dict_save_and_load_round_trip(tmp_path) -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=3)
    _random_walk(net, post, 7)
    path = tmp_path / "post.pt"
    post.save(path)
    loaded = SWAGPosterior.load(path)
    assert loaded.num_snapshots == 7 and loaded.max_rank == 3
    assert loaded.param_shapes == post.param_shapes
    torch.testing.assert_close(loaded.mean, post.mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.variance, post.variance, rtol=0, atol=0)
    torch.testing.assert_close(loaded.deviations, post.deviations, rtol=0, atol=0)
    # collecting continues the ring where it stopped: the same next snapshots give the same state
    net_copy = copy.deepcopy(net)
    _random_walk(net, post, 3, seed=9)
    _random_walk(net_copy, loaded, 3, seed=9)
    assert loaded.num_snapshots == post.num_snapshots == 10
    torch.testing.assert_close(loaded.deviations, post.deviations, rtol=0, atol=0)
    torch.testing.assert_close(loaded.variance, post.variance, rtol=0, atol=0)


def test_load_into_writes_the_mean_by_name() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=2)
    recorded = _random_walk(net, post, 4)
    fresh = _net()
    post.load_into(fresh)
    torch.testing.assert_close(flat_params(fresh).double(), torch.stack(recorded).mean(0), rtol=0, atol=1e-6)


def test_errors_are_clear() -> None:
    net = _net()
    post = SWAGPosterior.from_model(net, max_rank=2)
    with pytest.raises(RuntimeError, match="no snapshots"):
        post.sample(3)
    with pytest.raises(RuntimeError, match="no snapshots"):
        _ = post.mean
    with pytest.raises(ValueError, match="max_rank"):
        SWAGPosterior.from_model(net, max_rank=-1)
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="does not match"):
        post.check_compatible(other)
    with pytest.raises(ValueError, match="shape"):
        post.collect(other)
    with torch.no_grad():
        net[2].bias[0] = math.nan
    with pytest.raises(FloatingPointError, match="2.bias"):
        post.collect(net)
    assert post.num_snapshots == 0  # nothing was added
    post.collect(_net())
    with pytest.raises(ValueError, match="num_samples"):
        post.sample(0)
    with pytest.raises(ValueError, match="scale"):
        post.sample(2, scale=-1.0)
