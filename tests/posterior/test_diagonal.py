"""``SWAGDiagonal``: the SWAG-Diagonal view of a SWAG posterior, ``SWAGPosterior.diagonal()``."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag.posterior.noise import StandardNormalTiles
from lightning_swag.posterior.sharding import DDPSliceLayout


def test_the_diagonal_view_shares_the_statistics_and_has_no_low_rank_term() -> None:
    net = nn.Linear(3, 2)
    post = random_walk_posterior(net, snapshots=5)
    diagonal = post.diagonal()
    assert diagonal.source is post and diagonal.diagonal() is diagonal and diagonal.rank == 0
    torch.testing.assert_close(diagonal.mean, post.mean, rtol=0, atol=0)
    variance, factor = diagonal.covariance_factors()
    assert factor is None and torch.equal(variance, post.variance)
    before = diagonal.mean
    post.collect(net)  # a view: it follows the posterior's later snapshots
    assert diagonal.num_snapshots == 6 and not torch.equal(diagonal.mean, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_params", [20, 3 * 16384 + 5])
def test_diagonal_samples_are_the_mean_plus_the_scaled_diagonal_noise_of_the_seed(dtype, num_params) -> None:
    """``post.diagonal().sample`` gives what ``post.sample(..., diagonal_only=True)`` gave: the noise
    table's ``z₁`` at the same (sample, column), ``θ̄ + √(scale·var) ⊙ z₁``."""
    net = nn.Linear(num_params - 1, 1)
    post = random_walk_posterior(net, snapshots=5, max_rank=4)
    scale, seed, first = 0.3, 9, 2
    samples = post.diagonal().sample(3, scale, seed=seed, first_sample=first, dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    z1 = StandardNormalTiles(seed, num_params, post.rank, "cpu").diagonal(torch.empty(3, num_params), first)
    mean, std = post.mean.to(compute), post.variance.sqrt().to(compute)
    expected = torch.addcmul(mean, z1.to(compute), std, value=math.sqrt(scale))
    torch.testing.assert_close(samples, expected.to(dtype), rtol=0, atol=0)
    # the full posterior's samples add the low-rank term to the same diagonal part
    full = post.sample(3, scale, seed=seed, first_sample=first, dtype=dtype)
    assert not torch.equal(full, samples)


def test_a_sharded_diagonal_view_draws_its_columns_of_the_whole_diagonal_samples() -> None:
    net = nn.Linear(7, 3)
    whole = random_walk_posterior(net, snapshots=5)
    parts = []
    for rank in range(2):
        part = type(whole)(
            whole.param_shapes, whole.max_rank, layout=DDPSliceLayout.build(whole.param_shapes, 2, rank)
        )
        part.load_state_dict(whole.state_dict())
        assert part.diagonal().is_sharded
        with pytest.raises(ValueError, match="sharded"):
            part.diagonal().sample(2, seed=1)
        parts.append(part.diagonal().sample_local(4, 0.5, seed=1))
    torch.testing.assert_close(torch.cat(parts, 1), whole.diagonal().sample(4, 0.5, seed=1), rtol=0, atol=0)
