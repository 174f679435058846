"""The noise table: the standard normal numbers of one seed, addressed by (sample, column).

A weight sample ``i`` needs diagonal noise ``z₁[i, :P]`` and low-rank noise ``z₂[i, :k]``. Both are
read from a fixed table of the seed, drawn in tiles from per-tile random streams, so that any chunk
of samples and any contiguous range of columns (a process's shard of the weights) draws exactly its
part of the same table: a seed fixes the samples whatever the chunking, the batches or the
sharding. Plain torch.
"""

from __future__ import annotations

import hashlib
import struct
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = ["COLUMNS_PER_STREAM", "NUMBERS_PER_TILE", "StandardNormalTiles", "derive_seed"]

COLUMNS_PER_STREAM = 2**14
"""Columns of the flat weight vector whose diagonal noise comes from one random stream. Fixed, so
that any contiguous part of the vector can draw exactly its own noise; small, so that a shard's
ragged edges waste few draws."""
NUMBERS_PER_TILE = 2**14
"""Random numbers drawn per stream at least: for small models one tile spans several samples."""
_LOW_RANK_STREAM = -1  # the tile column of the low-rank table


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every one of ``values`` (a hash, so nearby inputs give unrelated
    seeds): the random stream of one weight sample, or of one posterior of a MultiSWAG run."""
    packed = struct.pack(f"<{len(values)}q", *values)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


class StandardNormalTiles:
    """The standard normal noise of one seed, as a table addressed by (sample index, column).

    Sampling needs, for sample ``i``, diagonal noise ``z₁[i, :P]`` and low-rank noise ``z₂[i, :k]``.
    Both tables are cut into tiles, each drawn from its own random stream seeded by
    ``derive_seed(seed, tile row, tile column)``: a tile spans ``min(P, COLUMNS_PER_STREAM)`` columns and
    as many samples as keep it near :data:`NUMBERS_PER_TILE` numbers (one sample per tile for models of
    65k weights or more). Any chunk of samples, and any contiguous range of columns (a shard of the
    weights), draws exactly its part of the same table, so a seed fixes the samples whatever the
    chunking or the sharding. The most recently drawn tile is kept for the next chunk.

    Args:
        seed: the seed of the table.
        num_params: ``P``, the length of the whole flat weight vector (all shards together).
        rank: ``k``, the columns of the low-rank table.
        device: where the noise is drawn (its generator's device).
    """

    def __init__(self, seed: int, num_params: int, rank: int, device: torch.device | str) -> None:
        self.seed = seed
        self.num_params = num_params
        self.rank = rank
        self.device = torch.device(device)
        self.cols_per_tile = min(num_params, COLUMNS_PER_STREAM)
        self.rows_per_tile = max(1, NUMBERS_PER_TILE // self.cols_per_tile)
        self._generator = torch.Generator(device=self.device)
        self._last: tuple[tuple[int, int], Tensor] | None = None

    def _tile(self, row: int, col: int) -> Tensor:
        """Tile (row, col) of the diagonal table (col = -1: the low-rank table), drawn or cached."""
        key = (row, col)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if col == _LOW_RANK_STREAM:
            width = self.rank
        else:
            width = min(self.cols_per_tile, self.num_params - col * self.cols_per_tile)
        self._generator.manual_seed(derive_seed(self.seed, row, col))
        tile = torch.randn(self.rows_per_tile, width, generator=self._generator, device=self.device)
        self._last = (key, tile)
        return tile

    def diagonal(self, out: Tensor, first_sample: int, first_column: int = 0) -> Tensor:
        """Fill ``out`` ``[n, c]`` with ``z₁[first_sample : first_sample + n, first_column : first_column + c]``.

        Whole one-sample tiles are drawn straight into ``out``, in parallel on
        ``torch.get_num_threads()`` threads (each tile has its own generator, so the numbers do not
        depend on the threads); partial tiles are drawn whole and copied.
        """
        rows, cols = out.shape
        rpt, cpt = self.rows_per_tile, self.cols_per_tile
        direct: list[tuple[Tensor, int]] = []
        for tile_row in range(first_sample // rpt, (first_sample + rows - 1) // rpt + 1):
            r0, r1 = max(first_sample, tile_row * rpt), min(first_sample + rows, (tile_row + 1) * rpt)
            for tile_col in range(first_column // cpt, (first_column + cols - 1) // cpt + 1):
                c0, c1 = max(first_column, tile_col * cpt), min(first_column + cols, (tile_col + 1) * cpt)
                target = out[r0 - first_sample : r1 - first_sample, c0 - first_column : c1 - first_column]
                whole = rpt == 1 and c0 == tile_col * cpt and c1 - c0 == min(cpt, self.num_params - c0)
                if whole and target.dtype == torch.float32 and target.is_contiguous():
                    direct.append((target, derive_seed(self.seed, tile_row, tile_col)))
                else:
                    tile = self._tile(tile_row, tile_col)
                    rows_in_tile = slice(r0 - tile_row * rpt, r1 - tile_row * rpt)
                    target.copy_(tile[rows_in_tile, c0 - tile_col * cpt : c1 - tile_col * cpt])
        self._draw_into(direct)
        return out

    def _draw_into(self, tiles: list[tuple[Tensor, int]]) -> None:
        """Draw each ``(target, seed)`` tile into its target (the same numbers as :meth:`_tile`)."""
        workers = min(len(tiles), torch.get_num_threads())
        if workers <= 1:
            for target, seed in tiles:
                self._generator.manual_seed(seed)
                torch.randn(target.shape, generator=self._generator, out=target)
            return

        # Grad and inference modes are per thread: the workers take the caller's, so that they may
        # write into tensors made under torch.inference_mode (as in Lightning's predict loop).
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def draw(part: list[tuple[Tensor, int]]) -> None:
            generator = torch.Generator(device=self.device)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for target, seed in part:
                    generator.manual_seed(seed)
                    torch.randn(target.shape, generator=generator, out=target)

        with ThreadPoolExecutor(workers) as pool:  # torch.randn releases the GIL
            list(pool.map(draw, [tiles[i::workers] for i in range(workers)]))

    def low_rank(self, first_sample: int, num_samples: int) -> Tensor:
        """``z₂[first_sample : first_sample + num_samples, :k]`` (float32)."""
        rpt = self.rows_per_tile
        parts = []
        for tile_row in range(first_sample // rpt, (first_sample + num_samples - 1) // rpt + 1):
            r0 = max(first_sample, tile_row * rpt)
            r1 = min(first_sample + num_samples, (tile_row + 1) * rpt)
            parts.append(self._tile(tile_row, _LOW_RANK_STREAM)[r0 - tile_row * rpt : r1 - tile_row * rpt])
        return parts[0] if len(parts) == 1 else torch.cat(parts)
