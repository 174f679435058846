"""SWAG's running statistics against direct computations over the snapshots, and the draws' covariance."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_swag.posterior.noise import StandardNormalTiles
from lightning_swag.posterior.statistics import SWAGStatistics


def _collect(snapshots: torch.Tensor, max_rank: int, dtype: torch.dtype = torch.float64) -> SWAGStatistics:
    stats = SWAGStatistics(snapshots.shape[1], max_rank, dtype, dtype, torch.device("cpu"))
    for row in snapshots:
        stats.scratch.copy_(row)
        stats.add_scratch()
    return stats


def _draw(
    stats: SWAGStatistics, num: int, scale: float, seed: int, spans=None, first: int = 0
) -> torch.Tensor:
    """Samples of the whole vector (one span unless given), low-rank part included."""
    size = stats.mean.numel()
    return stats.draw(
        num_samples=num,
        scale=scale,
        seed=seed,
        first_sample=first,
        dtype=torch.float64,
        spans=spans or [(0, 0, size)],
        num_params=size,
        low_rank=True,
    )


def test_moments_and_ring_match_the_snapshots() -> None:
    snapshots = torch.randn(9, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 100
    stats = _collect(snapshots, max_rank=4)
    torch.testing.assert_close(stats.mean, snapshots.mean(dim=0))
    torch.testing.assert_close(stats.variance(), snapshots.var(dim=0, correction=0))
    assert (stats.num_snapshots, stats.rank) == (9, 4)
    # deviation row i of the paper: θᵢ minus the running mean after i snapshots; the last K, oldest first
    running = torch.cumsum(snapshots, dim=0) / torch.arange(1, 10, dtype=torch.float64)[:, None]
    torch.testing.assert_close(stats.ordered_deviations(), (snapshots - running)[-4:])


def test_few_snapshots_and_no_ring() -> None:
    snapshots = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = _collect(snapshots, max_rank=4)
    assert stats.rank == 3 and stats.ordered_deviations().shape == (3, 5)
    diagonal = _collect(snapshots, max_rank=0)
    assert diagonal.rank == 0 and diagonal.ordered_deviations().shape == (0, 5)
    torch.testing.assert_close(diagonal.variance(), snapshots.var(dim=0, correction=0))


def test_welford_keeps_float32_precision_far_from_zero() -> None:
    base = torch.full((4,), 1e4, dtype=torch.float64)
    offsets = torch.randn(50, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e-2
    stats = _collect((base + offsets).float().double(), max_rank=0, dtype=torch.float32)
    exact = (base + offsets).float().double().var(dim=0, correction=0)
    torch.testing.assert_close(stats.variance().double(), exact, rtol=2e-2, atol=0)


def test_diagonal_draws_are_the_mean_plus_scaled_noise_of_the_seed() -> None:
    snapshots = torch.randn(5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stats = _collect(snapshots, max_rank=0)
    samples = _draw(stats, 4, 0.25, seed=11)
    z = StandardNormalTiles(11, 7, 0, "cpu").diagonal(torch.empty(4, 7, dtype=torch.float64), 0)
    expected = snapshots.mean(0) + 0.5 * snapshots.var(0, correction=0).sqrt() * z
    torch.testing.assert_close(samples, expected)
    torch.testing.assert_close(_draw(stats, 3, 0.0, seed=11), snapshots.mean(0).expand(3, -1))


def test_draws_have_the_swag_covariance() -> None:
    snapshots = torch.randn(8, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    stats = _collect(snapshots, max_rank=3)
    samples = _draw(stats, 40_000, 0.5, seed=5)
    deviations = stats.ordered_deviations()
    expected = 0.5 * (torch.diag(stats.variance()) + deviations.T @ deviations / (3 - 1))
    centred = samples - samples.mean(0)
    empirical = centred.T @ centred / samples.shape[0]
    torch.testing.assert_close(empirical, expected, atol=0.04 * float(expected.diag().max()), rtol=0)
    torch.testing.assert_close(samples.mean(0), stats.mean, atol=0.03, rtol=0)


def test_draws_of_a_shard_are_columns_of_the_whole_draws() -> None:
    snapshots = torch.randn(6, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    whole = _draw(_collect(snapshots, max_rank=3), 5, 1.0, seed=9)
    chunks = torch.cat(
        [_draw(_collect(snapshots, max_rank=3), n, 1.0, seed=9, first=f) for f, n in ((0, 2), (2, 3))]
    )
    torch.testing.assert_close(chunks, whole)  # same numbers, up to the rounding of the matmul
    # columns 2..5 and 7..9 held here (two spans of the global vector): the same numbers as the whole draw
    local = torch.cat([snapshots[:, 2:5], snapshots[:, 7:10]], dim=1)
    shard = _collect(local, max_rank=3)
    shard_samples = shard.draw(5, 1.0, 9, 0, torch.float64, [(0, 2, 3), (3, 7, 3)], 10, low_rank=True)
    torch.testing.assert_close(shard_samples[:, :3], whole[:, 2:5])
    torch.testing.assert_close(shard_samples[:, 3:], whole[:, 7:10])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draws_in_another_dtype_are_computed_in_float32_and_cached_until_the_next_snapshot(dtype) -> None:
    snapshots = torch.randn(4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    stats = _collect(snapshots, max_rank=2)
    mean, std = stats.sampling_moments(dtype)
    assert mean.dtype == std.dtype == dtype
    torch.testing.assert_close(std.double(), snapshots.var(0, correction=0).sqrt(), rtol=1e-2, atol=0)
    assert stats.sampling_moments(dtype)[0] is mean  # cached
    stats.scratch.copy_(snapshots[0])
    stats.add_scratch()
    assert stats.sampling_moments(dtype)[0] is not mean
    drawn = stats.draw(2, 1.0, 0, 0, dtype, [(0, 0, 6)], 6, low_rank=True)
    assert drawn.dtype == torch.float32 and math.isfinite(float(drawn.sum()))
