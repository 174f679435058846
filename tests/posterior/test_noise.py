"""The noise table of one seed: any chunk of samples and any range of columns reads the same numbers."""

from __future__ import annotations

import torch

from lightning_swag.posterior.noise import (
    COLUMNS_PER_STREAM,
    NUMBERS_PER_TILE,
    StandardNormalTiles,
    derive_seed,
)


def _reference_entry_table(seed: int, num_samples: int, num_params: int) -> torch.Tensor:
    """The diagonal table built tile by tile from its documented streams, independently of the class."""
    cols = min(num_params, COLUMNS_PER_STREAM)
    rows = max(1, NUMBERS_PER_TILE // cols)
    table = torch.empty(num_samples, num_params)
    for r in range(0, num_samples, rows):
        for c in range(0, num_params, cols):
            width = min(cols, num_params - c)
            g = torch.Generator().manual_seed(derive_seed(seed, r // rows, c // cols))
            tile = torch.randn(rows, width, generator=g)
            table[r : r + rows, c : c + width] = tile[: num_samples - r]
    return table


def test_derive_seed_is_a_deterministic_63_bit_seed_of_every_value() -> None:
    seeds = {derive_seed(7, i, j) for i in range(20) for j in range(-1, 5)}
    assert len(seeds) == 20 * 6  # nearby inputs, unrelated seeds
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(7, 1, 2) == derive_seed(7, 1, 2) != derive_seed(7, 2, 1)
    torch.Generator().manual_seed(max(seeds))


def test_diagonal_chunks_and_column_ranges_read_the_same_table() -> None:
    num_samples, num_params = 23, 1000  # 16 samples per tile: chunks cross tile rows
    whole = StandardNormalTiles(5, num_params, 3, "cpu").diagonal(torch.empty(num_samples, num_params), 0)
    torch.testing.assert_close(whole, _reference_entry_table(5, num_samples, num_params), rtol=0, atol=0)
    tiles = StandardNormalTiles(5, num_params, 3, "cpu")
    for first, count in ((0, 5), (5, 13), (18, 5)):
        for c0, c1 in ((0, 1000), (0, 317), (317, 1000)):
            part = tiles.diagonal(torch.empty(count, c1 - c0), first, c0)
            torch.testing.assert_close(part, whole[first : first + count, c0:c1], rtol=0, atol=0)
    other = StandardNormalTiles(6, num_params, 3, "cpu").diagonal(torch.empty(num_samples, num_params), 0)
    assert not torch.equal(other, whole)
    assert abs(float(whole.mean())) < 0.05 and abs(float(whole.std()) - 1) < 0.05


def test_wide_tiles_drawn_in_parallel_equal_the_tiles_drawn_one_by_one() -> None:
    num_params = COLUMNS_PER_STREAM + 100  # one sample per tile: whole tiles are drawn straight into out
    direct = StandardNormalTiles(1, num_params, 2, "cpu").diagonal(torch.empty(3, num_params), 0)
    copied = StandardNormalTiles(1, num_params, 2, "cpu").diagonal(
        torch.empty(3, num_params, dtype=torch.float64), 0
    )
    torch.testing.assert_close(direct.double(), copied, rtol=0, atol=0)
    torch.testing.assert_close(direct, _reference_entry_table(1, 3, num_params), rtol=0, atol=0)
    shard = StandardNormalTiles(1, num_params, 2, "cpu").diagonal(
        torch.empty(2, 250), 1, COLUMNS_PER_STREAM - 150
    )
    torch.testing.assert_close(shard, direct[1:3, COLUMNS_PER_STREAM - 150 :], rtol=0, atol=0)


def test_low_rank_noise_is_the_same_whatever_the_chunking() -> None:
    tiles = StandardNormalTiles(3, 10_000, 4, "cpu")  # one sample per tile row: each sample its own stream
    whole = tiles.low_rank(0, 9)
    assert whole.shape == (9, 4) and whole.dtype == torch.float32
    chunked = torch.cat([StandardNormalTiles(3, 10_000, 4, "cpu").low_rank(i, 3) for i in (0, 3, 6)])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    rows = max(1, NUMBERS_PER_TILE // 10_000)
    g = torch.Generator().manual_seed(derive_seed(3, 4 // rows, -1))
    torch.testing.assert_close(whole[4], torch.randn(rows, 4, generator=g)[4 % rows], rtol=0, atol=0)
