"""The SWAG posterior over a model's weights, in plain PyTorch (no Lightning inside).

SWAG (Maddox et al., 2019) fits a Gaussian to the weights visited by SGD:

* the SWA mean ``θ̄ = (1/n) Σ θ_i``,
* the diagonal variance ``E[θ²] − E[θ]²``,
* a low-rank covariance ``D̂ᵀD̂ / (k − 1)`` from the last ``k`` deviations ``θ_i − θ̄_i``.

Samples are ``θ̄ + √scale · (√var ⊙ z₁ + D̂ᵀz₂ / √(k − 1))`` with ``z₁ ~ N(0, I_P)`` and
``z₂ ~ N(0, I_k)``, so their covariance is ``scale · (diag(var) + D̂ᵀD̂ / (k − 1))``; ``scale = 0.5``
is the paper's ``1/√2`` applied to both terms.

A posterior may be *sharded* (see :mod:`lightning_swag.sharding`): each process then keeps the
statistics of its part of the flat weight vector only, draws its part of every sample
(:meth:`SWAGPosterior.sample_local`, the same numbers as the unsharded posterior's samples), and joins
the parts with :meth:`SWAGPosterior.gather` or :meth:`SWAGPosterior.save`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_swag.checkpoint import (
    SHARDED_STATISTICS,
    is_posterior_state,
    load_file,
    posterior_state_from_entries,
)
from lightning_swag.sharding import (
    ShardLayout,
    dtensor_views,
    gather_columns,
    load_dtensor_views,
    reshard_fsdp,
)

__all__ = [
    "StandardNormalTiles",
    "SWAGPosterior",
    "canonical_name",
    "derive_seed",
    "select_parameters",
    "unwrap_model",
]

_FORMAT_VERSION = 2
# Columns of the deviation buffer converted to another dtype at a time while sampling.
_SAMPLE_BLOCK = 2**18
NOISE_BLOCK = 2**14
"""Columns of the flat weight vector whose diagonal noise is drawn from one random stream (see
:class:`StandardNormalTiles`). Fixed, so that any contiguous part of the vector, such as a process's
shard, can draw exactly its own noise; small, so that a shard's ragged edges waste few draws (the
extra cost of seeding a stream per block is about 5% of the draws for an 11M-weight model)."""
NOISE_TILE = 2**14
"""Random numbers drawn per stream at least: for small models one stream serves several samples."""
_LOW_RANK_STREAM = -1
# Name segments that wrappers insert between a module and its parameters: torch.compile
# (``_orig_mod``), FSDP1 and activation checkpointing. They never belong to a posterior's names.
_WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert (``net._orig_mod.0.weight`` → ``net.0.weight``)."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_SEGMENTS]
    return ".".join(parts)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` / ``DistributedDataParallel`` / ``DataParallel`` wrapper holds
    (repeatedly), or ``model`` itself. The wrapper shares its parameters with the inner module."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def named_tracked(model: nn.Module) -> dict[str, Tensor]:
    """``{canonical name: parameter}`` of every parameter of ``model`` (wrappers unwrapped)."""
    return {canonical_name(n): p for n, p in unwrap_model(model).named_parameters()}


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every one of ``values`` (a hash, so nearby inputs give unrelated
    seeds): the random stream of one weight sample, or of one posterior of a MultiSWAG run."""
    packed = struct.pack(f"<{len(values)}q", *values)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def select_parameters(
    model: nn.Module, include: Sequence[str] | str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs SWAG tracks, in ``model.parameters()`` order.

    Names are canonical: wrapper segments such as torch.compile's ``_orig_mod.`` are removed, so a
    posterior collected from a compiled model applies to the plain one and vice versa.

    Args:
        model: the network.
        include: ``None`` tracks every parameter with ``requires_grad=True``. Otherwise names or
            shell-style patterns (``"head.*"``, ``"*.weight"``) matched against the parameter
            name; a module name (``"classifier"``) selects all of its parameters.
    """
    named = [(n, p) for n, p in named_tracked(model).items() if p.requires_grad]
    if include is None:
        selected = named
    else:
        patterns = [include] if isinstance(include, str) else list(include)
        if not patterns:
            raise ValueError("include is empty: give at least one parameter name or pattern, or None.")

        def matches(name: str) -> bool:
            return any(fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".") for pat in patterns)

        selected = [(n, p) for n, p in named if matches(n)]
        if not selected:
            available = ", ".join(n for n, _ in named[:10])
            raise ValueError(
                f"include={patterns!r} matches no trainable parameter of {type(model).__name__}. "
                f"Some names are: {available}."
            )
    if not selected:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True to track.")
    return selected


class StandardNormalTiles:
    """The standard normal noise of one seed, as a table addressed by (sample index, column).

    Sampling needs, for sample ``i``, diagonal noise ``z₁[i, :P]`` and low-rank noise ``z₂[i, :k]``.
    Both tables are cut into tiles, each drawn from its own random stream seeded by
    ``derive_seed(seed, tile row, tile column)``: a tile spans ``min(P, NOISE_BLOCK)`` columns and
    as many samples as keep it near :data:`NOISE_TILE` numbers (one sample per tile for models of
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
        self.cols_per_tile = min(num_params, NOISE_BLOCK)
        self.rows_per_tile = max(1, NOISE_TILE // self.cols_per_tile)
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


class SWAGPosterior:
    """Running SWAG moments and deviation buffer for a fixed set of named parameters.

    Statistics are kept for a flat vector of the tracked parameters, concatenated in
    ``model.parameters()`` order (the order of ``torch.nn.utils.parameters_to_vector``). Parameters
    are matched by **name**, never by position, so a posterior can only be applied to a model with
    the same names and shapes.

    The moments are updated with Welford's method: the running mean and the sum of squared
    deviations from it, so the variance keeps its precision even in float32, where
    ``E[θ²] − E[θ]²`` would cancel for weights that move little around a large value.

    Memory (see :attr:`nbytes`): ``P`` tracked parameters and rank ``K`` take ``2·P`` moment
    elements (float64 by default, 16·P bytes), ``K·P`` deviation elements (float32 by default,
    4·K·P bytes) and one ``P`` scratch vector in the moment dtype; sampling in float32 adds a cached
    float32 mean and standard deviation (8·P bytes).

    Args:
        param_shapes: ordered ``{name: shape}`` of the tracked parameters. Use :meth:`from_model`
            to build it from a network.
        max_rank: number of deviation columns kept (``K``); ``0`` gives SWAG-Diagonal.
        moment_dtype: dtype of the mean and the sum of squared deviations.
        deviation_dtype: dtype of the deviation buffer.
        device: where statistics live (e.g. ``"cpu"`` to keep them off the GPU).
        layout: keep only this process's part of the weights (a sharded posterior, see
            :mod:`lightning_swag.sharding`); ``None`` keeps all of them. :meth:`from_model` picks it.

    Sharded posteriors: ``param_shapes``, ``num_params`` and :meth:`check_compatible` keep their global
    meaning, while :attr:`mean`, :attr:`variance`, :attr:`deviations`, :meth:`covariance_factors` and
    :attr:`nbytes` are this process's part (``num_local_params`` columns, in the order of
    ``layout.pieces``).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> post = SWAGPosterior.from_model(net, max_rank=5)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1)
        ...     post.collect(net)
        >>> post.num_snapshots, post.rank, post.sample(10, seed=0).shape
        (4, 4, torch.Size([10, 8]))
    """

    def __init__(
        self,
        param_shapes: Mapping[str, Sequence[int]],
        max_rank: int = 20,
        *,
        moment_dtype: torch.dtype = torch.float64,
        deviation_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        layout: ShardLayout | None = None,
    ) -> None:
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 0:
            raise ValueError(f"max_rank must be an int >= 0 (0 = SWAG-Diagonal), got {max_rank!r}.")
        if not param_shapes:
            raise ValueError("param_shapes is empty: a posterior needs at least one parameter.")
        for dtype_name, dtype in (("moment_dtype", moment_dtype), ("deviation_dtype", deviation_dtype)):
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"{dtype_name} must be a floating torch.dtype, got {dtype!r}.")
        self.param_shapes: dict[str, torch.Size] = {
            canonical_name(n): torch.Size(s) for n, s in param_shapes.items()
        }
        self.param_numels: list[int] = [math.prod(s) for s in self.param_shapes.values()]
        self.num_params = sum(self.param_numels)
        self.max_rank = max_rank
        if layout is not None and layout.shapes != self.param_shapes:
            raise ValueError("layout does not describe these parameters (other names or shapes).")
        self._layout = layout
        num_local = layout.num_local if layout is not None else self.num_params
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._mean = torch.zeros(num_local, dtype=moment_dtype, device=device)
        self._sum_sq_dev = torch.zeros_like(self._mean)
        self._scratch = torch.empty_like(self._mean)
        self._make_scratch_views()
        # The ring buffer of deviations: allocated once, row ``n % max_rank`` written by snapshot n.
        self._deviations = torch.zeros(max_rank, num_local, dtype=deviation_dtype, device=device)
        self._num_snapshots = 0
        self._sampling_cache: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        max_rank: int = 20,
        *,
        include: Sequence[str] | str | None = None,
        moment_dtype: torch.dtype = torch.float64,
        deviation_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        shard: bool = False,
    ) -> SWAGPosterior:
        """An empty posterior for ``model``'s trainable parameters (or those matching ``include``).

        ``device`` defaults to the device of the model's first tracked parameter.

        Sharding: parameters sharded by FSDP2's ``fully_shard`` (DTensors) always give a posterior of
        this process's shards. ``shard=True`` with plain parameters and an initialised process group
        of several processes (DDP) keeps a ``1/world_size`` slice of the weights on each process.
        """
        selected = select_parameters(model, include)
        uninitialized = [n for n, p in selected if isinstance(p, nn.parameter.UninitializedParameter)]
        if uninitialized:
            raise ValueError(
                f"Parameters {uninitialized[:5]} of {type(model).__name__} are not initialized yet (lazy "
                "modules such as nn.LazyLinear learn their shape at the first forward pass). Run one "
                "forward pass before building the posterior."
            )
        if device is None:
            device = selected[0][1].device
        return cls(
            {n: p.shape for n, p in selected},
            max_rank,
            moment_dtype=moment_dtype,
            deviation_dtype=deviation_dtype,
            device=device,
            layout=ShardLayout.for_parameters(selected, shard),
        )

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def moment_dtype(self) -> torch.dtype:
        return self._mean.dtype

    @property
    def deviation_dtype(self) -> torch.dtype:
        return self._deviations.dtype

    @property
    def param_names(self) -> list[str]:
        return list(self.param_shapes)

    @property
    def num_snapshots(self) -> int:
        """How many weight snapshots have been collected."""
        return self._num_snapshots

    @property
    def rank(self) -> int:
        """Number of filled deviation rows, ``k = min(num_snapshots, max_rank)``."""
        return min(self._num_snapshots, self.max_rank)

    @property
    def layout(self) -> ShardLayout | None:
        """The part of the weights this process keeps (``None``: all of them)."""
        return self._layout

    @property
    def is_sharded(self) -> bool:
        """Whether this process keeps only a part of the weights' statistics."""
        return self._layout is not None

    @property
    def num_local_params(self) -> int:
        """Columns of the statistics this process keeps (``num_params`` when unsharded)."""
        return self._mean.numel()

    @property
    def local_ranges(self) -> list[tuple[int, int]]:
        """The global ``[start, end)`` ranges of the flat weight vector kept here, in local order."""
        return self._layout.ranges if self._layout is not None else [(0, self.num_params)]

    @property
    def nbytes(self) -> int:
        """Bytes held by this posterior's statistics on its device (moments, scratch, deviation
        buffer and any cached float32 sampling moments); for a sharded posterior, this process's."""
        tensors = [self._mean, self._sum_sq_dev, self._scratch, self._deviations]
        tensors += [t for pair in self._sampling_cache.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def mean(self) -> Tensor:
        """The SWA weights ``θ̄`` as a flat ``[P]`` tensor (a copy; sharded: this process's part)."""
        self._require_snapshots("mean")
        return self._mean.clone()

    @property
    def variance(self) -> Tensor:
        """Diagonal variance ``(1/n) Σ (θ_i − θ̄)²`` (the population variance of the snapshots)."""
        self._require_snapshots("variance")
        return self._sum_sq_dev / self._num_snapshots

    @property
    def second_moment(self) -> Tensor:
        """``E[θ²] = var + θ̄²`` as a flat ``[P]`` tensor."""
        return self.variance + self._mean.square()

    @property
    def deviations(self) -> Tensor:
        """The ``[k, P]`` deviation rows ``θ_i − θ̄_i``, oldest first (a copy)."""
        k = self.rank
        if self._num_snapshots <= self.max_rank or self.max_rank == 0:
            return self._deviations[:k].clone()
        start = self._num_snapshots % self.max_rank
        return torch.cat([self._deviations[start:], self._deviations[:start]])

    def __repr__(self) -> str:
        sharded = f", sharded={self._layout.describe()}" if self._layout is not None else ""
        return (
            f"SWAGPosterior(num_params={self.num_params}, num_snapshots={self.num_snapshots}, "
            f"rank={self.rank}/{self.max_rank}, device={self.device}, moment_dtype={self.moment_dtype}, "
            f"deviation_dtype={self.deviation_dtype}{sharded})"
        )

    # ------------------------------------------------------------------ collection
    def collect(self, model: nn.Module | Mapping[str, Tensor]) -> None:
        """Add a snapshot of the tracked parameters of ``model`` (a module, or a name→tensor map).

        Raises:
            KeyError / ValueError: when a tracked parameter is missing or has another shape.
            FloatingPointError: when a weight is NaN or infinite (the snapshot is not added).
        """
        if isinstance(model, nn.Module):
            named = named_tracked(model)
        else:
            named = {canonical_name(n): t for n, t in model.items()}
        tensors = []
        for name, shape in self.param_shapes.items():
            tensor = named.get(name)
            if tensor is None:
                raise KeyError(
                    f"The posterior tracks parameter {name!r}, which the model does not have. "
                    "Is this posterior from another architecture?"
                )
            if tensor.shape != shape:
                raise ValueError(
                    f"Parameter {name!r} has shape {tuple(tensor.shape)}, the posterior expects "
                    f"{tuple(shape)}. Is this posterior from another architecture?"
                )
            tensors.append(tensor.detach())
        if self._layout is not None:  # this process's pieces only: views of the (local) weights
            tensors = self._layout.sources(dict(zip(self.param_shapes, tensors, strict=True)))
        with torch.no_grad():
            torch._foreach_copy_(self._scratch_views, tensors)
            self._add_flat_scratch()

    def collect_flat(self, theta: Tensor) -> None:
        """Add a snapshot given as a flat ``[P]`` vector (tracked parameters concatenated; a sharded
        posterior keeps its part of it)."""
        if theta.dim() != 1 or theta.numel() != self.num_params:
            raise ValueError(
                f"Expected a flat vector of {self.num_params} weights, got shape {tuple(theta.shape)}."
            )
        with torch.no_grad():
            self._scratch.copy_(theta if self._layout is None else self._layout.take(theta))
            self._add_flat_scratch()

    def _add_flat_scratch(self) -> None:
        theta = self._scratch
        if not bool(torch.isfinite(theta).all()):
            bad = [
                name
                for name, view in zip(self._scratch_names, self._scratch_views, strict=True)
                if not bool(torch.isfinite(view).all())
            ]
            raise FloatingPointError(
                f"Snapshot {self._num_snapshots + 1} has NaN or infinite weights in {', '.join(bad)}; "
                "it was not added to the posterior. Lower the learning rate or clip gradients."
            )
        n = self._num_snapshots + 1
        # Welford: δ = θ − θ̄_old; θ̄ += δ/n; M2 += δ·(θ − θ̄_new) = δ²·(n−1)/n. The deviation row of
        # the paper, θ − θ̄_new, is δ·(n−1)/n. No E[θ²] is ever formed, so nothing cancels.
        delta = theta.sub_(self._mean)
        self._mean.add_(delta, alpha=1.0 / n)
        delta.mul_((n - 1) / n)  # now θ − θ̄_new
        self._sum_sq_dev.addcmul_(delta, delta, value=n / (n - 1) if n > 1 else 0.0)
        if self.max_rank > 0:
            self._deviations[(n - 1) % self.max_rank].copy_(delta)
        self._num_snapshots = n
        self._sampling_cache.clear()

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        num_samples: int,
        scale: float = 0.5,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        first_sample: int = 0,
        diagonal_only: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw flat weight vectors ``[num_samples, P]`` from the SWAG Gaussian.

        The noise of a seed is a fixed table, addressed by sample index (``first_sample``,
        ``first_sample + 1``, ...) and column (see :class:`StandardNormalTiles`), so sample ``i`` of a
        seed is the same whether it is drawn alone or with others, in any chunking.

        Args:
            num_samples: how many weight vectors.
            scale: covariance scale; ``0.5`` is the paper's ``1/√2`` on the standard deviation.
                ``0`` returns the SWA mean.
            generator: a random source to draw the seed from, when ``seed`` is not given (on any
                device). Without both, the global RNG supplies the seed; it is never reseeded.
            seed: the seed of the samples (an int >= 0); exclusive with ``generator``.
            first_sample: index of the first sample in the seed's sequence.
            diagonal_only: ignore the low-rank term (SWAG-Diagonal).
            dtype: dtype of the result (default: the moment dtype). Float32 results are computed in
                float32 from float32 copies of the mean and standard deviation (cached until the
                next snapshot), float64 ones in float64.
            device: where to put the result (default: the posterior's device).

        Raises:
            ValueError: the posterior is sharded (use :meth:`sample_local`, or :meth:`gather` first).
        """
        if self._layout is not None:
            raise ValueError(
                f"This posterior is sharded ({self._layout.describe()} on this process), so it cannot draw "
                "whole weight vectors: draw this process's part with sample_local(..., seed=s) (the same s on "
                "every process), or join the parts with gather() / save() first."
            )
        return self.sample_local(
            num_samples,
            scale,
            generator,
            seed=seed,
            first_sample=first_sample,
            diagonal_only=diagonal_only,
            dtype=dtype,
            device=device,
        )

    def sample_local(
        self,
        num_samples: int,
        scale: float = 0.5,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        first_sample: int = 0,
        diagonal_only: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """This process's columns ``[num_samples, num_local_params]`` of the samples :meth:`sample`
        draws (all columns when unsharded), with the same arguments.

        Every process draws its own columns of the seed's noise table and the same low-rank noise, so
        the parts joined by columns (:func:`~lightning_swag.sharding.all_gather_columns`) are the
        samples of the unsharded posterior, whatever the sharding. No communication. A sharded
        posterior needs ``seed``, the same on every process.
        """
        if self._layout is not None and seed is None:
            raise ValueError(
                "sample_local of a sharded posterior needs seed=<int>, the same on every process: the "
                "processes' parts only form one sample when they come from the same noise table."
            )
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
        if not isinstance(scale, (int, float)) or not scale >= 0 or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}.")
        if not isinstance(first_sample, int) or first_sample < 0:
            raise ValueError(f"first_sample must be an int >= 0, got {first_sample!r}.")
        self._require_snapshots("sample")
        seed = self._resolve_seed(seed, generator)
        out_dtype = dtype or self.moment_dtype
        compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        mean, std = self._sampling_moments(compute_dtype)
        if scale == 0:
            samples = mean.expand(num_samples, -1).clone()
        else:
            noise = StandardNormalTiles(seed, self.num_params, self.rank, self.device)
            samples = torch.empty(num_samples, self.num_local_params, dtype=compute_dtype, device=self.device)
            spans = self._layout.spans if self._layout is not None else [(0, 0, self.num_params)]
            for local, start, count in spans:  # global columns: the same numbers whatever the sharding
                noise.diagonal(samples[:, local : local + count], first_sample, start)
            root = math.sqrt(scale)
            torch.addcmul(mean, samples, std, value=root, out=samples)  # θ̄ + √scale·√var ⊙ z₁, one pass
            k = self.rank
            if k >= 2 and not diagonal_only:
                z2 = noise.low_rank(first_sample, num_samples).to(compute_dtype)
                self._add_low_rank(samples, z2, k, root)
        return samples.to(dtype=out_dtype, device=device or self.device)

    @staticmethod
    def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
        if seed is not None:
            if generator is not None:
                raise ValueError("Give either seed or generator, not both.")
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
            return seed
        draw = torch.randint(
            0, 2**62, (1,), generator=generator, device=generator.device if generator else None
        )
        return int(draw.item())

    def _sampling_moments(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The mean and standard deviation in ``dtype``: the scratch vector holds the std when
        ``dtype`` is the moment dtype; other dtypes are converted once and cached until the next
        snapshot."""
        if dtype == self.moment_dtype:
            std = torch.div(self._sum_sq_dev, self._num_snapshots, out=self._scratch).sqrt_()
            return self._mean, std
        if dtype not in self._sampling_cache:
            std = (self._sum_sq_dev / self._num_snapshots).sqrt_().to(dtype)
            self._sampling_cache[dtype] = (self._mean.to(dtype), std)
        return self._sampling_cache[dtype]

    def _add_low_rank(self, samples: Tensor, z2: Tensor, k: int, root_scale: float) -> None:
        """``samples += √scale · z₂ D̂ / √(k − 1)``, converting the deviations in column blocks only when their
        dtype differs from the samples' (never a full converted copy of the ``[K, P]`` buffer)."""
        # Rows of the ring buffer in any order give the same D̂ᵀD̂; no reordering needed.
        deviations = self._deviations[:k]
        alpha = root_scale / math.sqrt(k - 1)
        if deviations.dtype == samples.dtype:
            samples.addmm_(z2, deviations, alpha=alpha)
            return
        for start in range(0, self.num_local_params, _SAMPLE_BLOCK):
            cols = slice(start, start + _SAMPLE_BLOCK)
            samples[:, cols].addmm_(z2, deviations[:, cols].to(samples.dtype), alpha=alpha)

    def covariance_factors(self, diagonal_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(variance, D̂ / √(k−1))`` so that the covariance is ``diag(var) + LᵀL`` (``L`` may be None)."""
        variance = self.variance
        k = self.rank
        if diagonal_only or k < 2:
            return variance, None
        return variance, self.deviations.to(variance.dtype) / math.sqrt(k - 1)

    # ------------------------------------------------------------------ model I/O
    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``[..., P]`` vector into ``{name: tensor[..., *shape]}`` views."""
        if flat.shape[-1] != self.num_params:
            raise ValueError(
                f"Expected a last dimension of {self.num_params}, got shape {tuple(flat.shape)}."
            )
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.param_numels, dim=-1)
        return {
            name: chunk.reshape(*lead, *shape)
            for (name, shape), chunk in zip(self.param_shapes.items(), chunks, strict=True)
        }

    def unflatten_local(self, flat: Tensor) -> dict[str, Tensor]:
        """Split this process's columns ``[..., num_local_params]`` into ``{name: [..., *local shape]}``
        views: for FSDP2 shards, the shapes of the parameters' local shards (``param.to_local()``)."""
        if self._layout is None:
            return self.unflatten(flat)
        if self._layout.kind != "fsdp2":
            raise ValueError("A DDP slice cuts parameters; join the columns with all_gather_columns first.")
        if flat.shape[-1] != self.num_local_params:
            raise ValueError(
                f"Expected a last dimension of {self.num_local_params}, got shape {tuple(flat.shape)}."
            )
        lead = flat.shape[:-1]
        return {
            piece.name: flat[..., piece.local : piece.local + piece.count].reshape(*lead, *piece.local_shape)
            for piece in self._layout.pieces
            if piece.local_shape is not None
        }

    def flatten(self, model: nn.Module) -> Tensor:
        """The tracked parameters of ``model`` as one flat vector (a copy)."""
        self.check_compatible(model)
        named = named_tracked(model)
        return torch.cat([named[n].detach().reshape(-1) for n in self.param_shapes])

    def load_into(self, model: nn.Module, flat: Tensor | None = None) -> nn.Module:
        """Write ``flat`` (default: the SWA mean) into the tracked parameters of ``model``, in place.

        A posterior of FSDP2 shards writes this process's columns (``flat``: ``[num_local_params]``)
        into the local shards of the (sharded) model."""
        self.check_compatible(model)
        if flat is None:
            flat = self.mean
        if self._layout is not None:
            if self._layout.kind != "fsdp2":
                raise ValueError(
                    "This posterior keeps a DDP slice of the weights, which cannot fill a whole model: "
                    "gather() it to one process first (or predict with SWAGModule, which joins the samples)."
                )
            reshard_fsdp(model)
            named = named_tracked(model)
            with torch.no_grad():
                for name, value in self.unflatten_local(flat).items():
                    named[name].to_local().copy_(value)
            return model
        named = named_tracked(model)
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                named[name].copy_(value)
        return model

    def check_compatible(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` that names the mismatch when ``model`` does not fit this posterior."""
        named = named_tracked(model)
        missing = [n for n in self.param_shapes if n not in named]
        wrong = [
            f"{n}: model {tuple(named[n].shape)} vs posterior {tuple(s)}"
            for n, s in self.param_shapes.items()
            if n in named and named[n].shape != s
        ]
        if missing or wrong:
            model_params = sum(p.numel() for p in model.parameters())
            details = []
            if missing:
                details.append(f"missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if wrong:
                details.append(f"shape mismatches {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
            raise ValueError(
                f"The posterior ({self.num_params} weights in {len(self.param_shapes)} tensors) does not match "
                f"{type(model).__name__} ({model_params} weights): {'; '.join(details)}. "
                "Use the posterior collected from this architecture."
            )

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this posterior; tensors are stored as they live.

        Format 2 (this version) stores the Welford sum of squared deviations ``sum_sq_dev``; format 1
        files (with the second moment ``sq_mean``) are still read.

        Raises:
            ValueError: the posterior is sharded (use :meth:`gather`, :meth:`save` or
                :meth:`sharded_state_dict`).
        """
        if self._layout is not None:
            raise ValueError(
                f"This posterior is sharded ({self._layout.describe()} on this process), and a state dict "
                "holds whole statistics: join the parts with gather() (a collective) and take its state_dict(), "
                "or use save(path) / sharded_state_dict(prefix)."
            )
        return {
            "format_version": _FORMAT_VERSION,
            "param_shapes": {n: list(s) for n, s in self.param_shapes.items()},
            "max_rank": self.max_rank,
            "num_snapshots": self._num_snapshots,
            "mean": self._mean,
            "sum_sq_dev": self._sum_sq_dev,
            "deviations": self._deviations,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict` into this (same-shaped) posterior; a sharded
        posterior keeps its part of them."""
        state = _upgrade_state(state)
        shapes = {canonical_name(n): torch.Size(s) for n, s in state["param_shapes"].items()}
        if shapes != self.param_shapes or int(state["max_rank"]) != self.max_rank:
            raise ValueError(
                "Saved SWAG state does not match this posterior "
                f"(saved {len(shapes)} tensors, max_rank={state['max_rank']}; "
                f"here {len(self.param_shapes)} tensors, max_rank={self.max_rank}). "
                "Build the posterior with SWAGPosterior.from_state_dict instead."
            )
        spans = self._layout.spans if self._layout is not None else [(0, 0, self.num_params)]
        for local, start, count in spans:
            for mine, saved in (
                (self._mean, state["mean"]),
                (self._sum_sq_dev, state["sum_sq_dev"]),
                (self._deviations, state["deviations"]),
            ):
                mine[..., local : local + count].copy_(saved[..., start : start + count])
        self._num_snapshots = int(state["num_snapshots"])
        self._sampling_cache.clear()

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        device: torch.device | str | None = None,
        *,
        model: nn.Module | None = None,
        shard: bool = False,
    ) -> SWAGPosterior:
        """Build a posterior from :meth:`state_dict` output (dtypes preserved).

        With ``model``, the posterior is sharded as :meth:`from_model` would shard it for that model's
        parameters (FSDP2 shards, or a DDP slice with ``shard=True``) and keeps only this process's
        part of ``state``.
        """
        state = _upgrade_state(state)
        layout = None
        if model is not None:
            named = named_tracked(model)
            names = [canonical_name(n) for n in state["param_shapes"]]
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(
                    f"The model has no parameters {missing[:5]} that the saved posterior tracks."
                )
            layout = ShardLayout.for_parameters([(n, named[n]) for n in names], shard)
        post = cls(
            state["param_shapes"],
            int(state["max_rank"]),
            moment_dtype=state["mean"].dtype,
            deviation_dtype=state["deviations"].dtype,
            device=device if device is not None else state["mean"].device,
            layout=layout,
        )
        post.load_state_dict(state)
        return post

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the posterior to ``path`` with ``torch.save`` (tensors moved to CPU).

        A sharded posterior must call it on every process (a collective): the parts are gathered to
        global rank 0, which writes the unsharded posterior (it then holds it all in host memory).
        """
        if self._layout is not None:
            whole = self.gather(dst=0)
            if whole is not None:
                whole.save(path)
            dist.barrier()
            return
        state = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.state_dict().items()}
        torch.save(state, path)

    # ------------------------------------------------------------------ sharded posteriors
    def gather(self, dst: int = 0) -> SWAGPosterior | None:
        """The unsharded posterior (on the CPU) on global rank ``dst``, ``None`` on the other processes.

        A collective: every process must call it. The statistics travel row by row, so besides the
        result ``dst`` holds one padded row per process at a time. An unsharded posterior returns
        itself.
        """
        if self._layout is None:
            return self
        whole = None
        if dist.get_rank() == dst:
            whole = SWAGPosterior(
                self.param_shapes,
                self.max_rank,
                moment_dtype=self.moment_dtype,
                deviation_dtype=self.deviation_dtype,
                device="cpu",
            )
        pairs = [("_mean", None), ("_sum_sq_dev", None)] + [("_deviations", j) for j in range(self.max_rank)]
        for attribute, row in pairs:
            mine = getattr(self, attribute)
            mine = mine.unsqueeze(0) if row is None else mine[row : row + 1]
            target = None
            if whole is not None:
                target = getattr(whole, attribute)
                target = target.unsqueeze(0) if row is None else target[row : row + 1]
            gather_columns(mine, self._layout, dst, out=target)
        if whole is not None:
            whole._num_snapshots = self._num_snapshots
        return whole

    def sharded_state_dict(self, prefix: str) -> dict[str, Tensor]:
        """Per-parameter DTensor views of this process's statistics (FSDP2 posteriors), keyed
        ``<prefix><statistic>/<name>``, for ``torch.distributed.checkpoint``: saving writes every
        process's shards, loading fills this posterior in place (see :mod:`lightning_swag.checkpoint`)."""
        if self._layout is None or self._layout.kind != "fsdp2":
            raise ValueError("sharded_state_dict is for posteriors of FSDP2 (fully_shard) parameters.")
        buffers = (self._mean, self._sum_sq_dev, self._deviations)
        return dtensor_views(self._layout, dict(zip(SHARDED_STATISTICS, buffers, strict=True)), prefix)

    def sharded_description(self, prefix: str) -> dict[str, Any]:
        """Everything but the tensors of :meth:`sharded_state_dict`: what is needed to rebuild the
        posterior from them (plain Python values, stored in the callback state)."""
        return {
            "prefix": prefix,
            "format_version": _FORMAT_VERSION,
            "param_shapes": {n: list(s) for n, s in self.param_shapes.items()},
            "max_rank": self.max_rank,
            "num_snapshots": self._num_snapshots,
            "moment_dtype": str(self.moment_dtype).removeprefix("torch."),
            "deviation_dtype": str(self.deviation_dtype).removeprefix("torch."),
        }

    @classmethod
    def from_distributed_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str],
        description: Mapping[str, Any],
        model: nn.Module,
        device: torch.device | str | None = None,
    ) -> SWAGPosterior:
        """This process's part of a posterior stored by :meth:`sharded_state_dict` in the distributed
        checkpoint folder ``checkpoint``, for the FSDP2-sharded ``model`` (a collective: each process
        reads its own shards)."""
        reshard_fsdp(model)
        named = named_tracked(model)
        names = list(description["param_shapes"])
        layout = ShardLayout.fsdp2([(n, named[n]) for n in names])
        post = cls(
            description["param_shapes"],
            int(description["max_rank"]),
            moment_dtype=getattr(torch, description["moment_dtype"]),
            deviation_dtype=getattr(torch, description["deviation_dtype"]),
            device=device if device is not None else named[names[0]].device,
            layout=layout,
        )
        load_dtensor_views(post.sharded_state_dict(description["prefix"]), checkpoint)
        post._num_snapshots = int(description["num_snapshots"])
        return post

    @classmethod
    def from_sharded_entries(
        cls, description: Mapping[str, Any], entries: Mapping[str, Tensor]
    ) -> SWAGPosterior:
        """The unsharded posterior from whole per-parameter statistics, e.g. the ``_swag/`` entries of a
        distributed checkpoint consolidated with ``torch.distributed.checkpoint.format_utils``."""
        return cls.from_state_dict(posterior_state_from_entries(description, entries))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str | None = "cpu") -> SWAGPosterior:
        """Read a posterior written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is damaged, or a torch file that holds no SWAG posterior.
        """
        state = load_file(path, "SWAG posterior file")
        if not is_posterior_state(state):
            keys = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"{str(path)!r} is a torch file but not a SWAG posterior (found {keys}); write one with "
                "SWAGPosterior.save, or read a training checkpoint with SWAGModule/trainer.predict(ckpt_path=...)."
            )
        return cls.from_state_dict(state, device=device)

    def to(self, device: torch.device | str) -> SWAGPosterior:
        """Move the statistics to ``device`` (in place) and return ``self``."""
        device = torch.device(device)
        self._mean = self._mean.to(device)
        self._sum_sq_dev = self._sum_sq_dev.to(device)
        self._deviations = self._deviations.to(device)
        self._scratch = torch.empty_like(self._mean)
        self._make_scratch_views()
        self._sampling_cache.clear()
        return self

    # ------------------------------------------------------------------ helpers
    def _make_scratch_views(self) -> None:
        """Views of the scratch vector that snapshots are copied into, with their parameter names: one
        per parameter (shaped like it) when unsharded, one flat view per piece when sharded."""
        if self._layout is None:
            self._scratch_views = list(self._split(self._scratch))
            self._scratch_names = list(self.param_shapes)
        else:
            self._scratch_views = [self._scratch[p.local : p.local + p.count] for p in self._layout.pieces]
            self._scratch_names = [p.name for p in self._layout.pieces]

    def _split(self, flat: Tensor) -> Iterable[Tensor]:
        return (
            chunk.view(shape)
            for chunk, shape in zip(
                torch.split(flat, self.param_numels), self.param_shapes.values(), strict=True
            )
        )

    def _require_snapshots(self, what: str) -> None:
        if self._num_snapshots == 0:
            raise RuntimeError(
                f"The SWAG posterior holds no snapshots yet, so it has no {what}. Collect weights first "
                "(SWAGCallback during trainer.fit, or SWAGPosterior.collect), and check that training "
                "reached the callback's start_epoch."
            )


def _upgrade_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A format-2 state dict from a format-1 or format-2 one (format 1 stored ``E[θ²]``)."""
    version = state.get("format_version")
    if version == _FORMAT_VERSION:
        return dict(state)
    if version == 1:
        upgraded = {k: v for k, v in state.items() if k != "sq_mean"}
        mean, sq_mean, n = state["mean"], state["sq_mean"], int(state["num_snapshots"])
        variance = (sq_mean.double() - mean.double().square()).clamp_(min=0)
        upgraded["sum_sq_dev"] = (variance * n).to(mean.dtype)
        upgraded["format_version"] = _FORMAT_VERSION
        return upgraded
    raise ValueError(
        f"Unsupported SWAG state format {version!r} (this version reads formats 1 and {_FORMAT_VERSION})."
    )
