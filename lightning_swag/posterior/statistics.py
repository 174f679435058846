"""SWAG's statistics over a flat weight vector: Welford moments, the deviation ring, and sampling.

For snapshots ``θ₁ … θₙ`` of a vector (a process's local part of the tracked weights):

* the SWA mean ``θ̄`` and the sum of squared deviations from it ``M₂`` (Welford's updates, so the
  variance ``M₂ / n`` keeps its precision even in float32);
* the ring buffer of the last ``K`` deviation rows ``θᵢ − θ̄ᵢ``, allocated once.

Samples are ``θ̄ + √scale · (√var ⊙ z₁ + D̂ᵀz₂ / √(k − 1))`` with ``z₁``, ``z₂`` read from the noise
table of a seed (:mod:`lightning_swag.posterior.noise`) at global columns, so the covariance is
``scale · (diag(var) + D̂ᵀD̂ / (k − 1))`` whatever part of the vector is held here. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_swag.posterior.noise import StandardNormalTiles
from lightning_swag.posterior.sharding import Span

__all__ = ["DEVIATION_COLUMNS_PER_CONVERSION", "SWAGStatistics"]

DEVIATION_COLUMNS_PER_CONVERSION = 2**18
"""Columns of the deviation buffer converted to the samples' dtype at a time while sampling (never a
full converted copy of the ``[K, P]`` buffer)."""


class SWAGStatistics:
    """Running moments and deviation ring of a ``[num_local]`` vector.

    Args:
        num_local: length of the vector kept here.
        max_rank: deviation rows kept (``K``); ``0`` keeps none (SWAG-Diagonal).
        moment_dtype: dtype of the mean and of ``M₂``.
        deviation_dtype: dtype of the deviation ring.
        device: where the tensors live.
    """

    def __init__(
        self,
        num_local: int,
        max_rank: int,
        moment_dtype: torch.dtype,
        deviation_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.max_rank = max_rank
        self.mean = torch.zeros(num_local, dtype=moment_dtype, device=device)
        self.sum_sq_dev = torch.zeros_like(self.mean)
        self.scratch = torch.empty_like(self.mean)
        self.deviations = torch.zeros(max_rank, num_local, dtype=deviation_dtype, device=device)
        self.num_snapshots = 0
        self._sampling_cache: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    @property
    def rank(self) -> int:
        """Filled deviation rows, ``k = min(n, K)``."""
        return min(self.num_snapshots, self.max_rank)

    @property
    def tensors(self) -> list[Tensor]:
        """Every tensor held (moments, scratch, ring, cached sampling moments)."""
        cached = [t for pair in self._sampling_cache.values() for t in pair]
        return [self.mean, self.sum_sq_dev, self.scratch, self.deviations, *cached]

    def add_scratch(self) -> None:
        """Add the snapshot held in :attr:`scratch` (which it then overwrites)."""
        n = self.num_snapshots + 1
        # Welford: δ = θ − θ̄_old; θ̄ += δ/n; M2 += δ·(θ − θ̄_new) = δ²·(n−1)/n. The deviation row of
        # the paper, θ − θ̄_new, is δ·(n−1)/n. No E[θ²] is ever formed, so nothing cancels.
        delta = self.scratch.sub_(self.mean)
        self.mean.add_(delta, alpha=1.0 / n)
        delta.mul_((n - 1) / n)  # now θ − θ̄_new
        self.sum_sq_dev.addcmul_(delta, delta, value=n / (n - 1) if n > 1 else 0.0)
        if self.max_rank > 0:
            self.deviations[(n - 1) % self.max_rank].copy_(delta)
        self.num_snapshots = n
        self._sampling_cache.clear()

    def ordered_deviations(self) -> Tensor:
        """The ``[k, num_local]`` deviation rows, oldest first (a copy)."""
        k = self.rank
        if self.num_snapshots <= self.max_rank or self.max_rank == 0:
            return self.deviations[:k].clone()
        start = self.num_snapshots % self.max_rank
        return torch.cat([self.deviations[start:], self.deviations[:start]])

    def require_snapshots(self, what: str) -> None:
        """A ``RuntimeError`` saying how to collect snapshots when there are none (nothing has a ``what``)."""
        if self.num_snapshots == 0:
            raise RuntimeError(
                f"The SWAG posterior holds no snapshots yet, so it has no {what}. Collect weights first "
                "(SWAGCallback during trainer.fit, or SWAGPosterior.collect), and check that training "
                "reached the callback's start_epoch."
            )

    def variance(self) -> Tensor:
        """The diagonal variance ``M₂ / n`` (a new tensor)."""
        return self.sum_sq_dev / self.num_snapshots

    def assign(self, mean: Tensor, sum_sq_dev: Tensor, deviations: Tensor, num_snapshots: int) -> None:
        """Overwrite every statistic with local columns of saved ones (same shapes as held here)."""
        self.mean.copy_(mean)
        self.sum_sq_dev.copy_(sum_sq_dev)
        self.deviations.copy_(deviations)
        self.num_snapshots = num_snapshots
        self._sampling_cache.clear()

    def to(self, device: torch.device) -> None:
        """Move every tensor to ``device`` (in place; cached sampling moments are dropped)."""
        self.mean = self.mean.to(device)
        self.sum_sq_dev = self.sum_sq_dev.to(device)
        self.deviations = self.deviations.to(device)
        self.scratch = torch.empty_like(self.mean)
        self._sampling_cache.clear()

    # ------------------------------------------------------------------ sampling
    def sampling_moments(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The mean and standard deviation in ``dtype``: the scratch vector holds the std when
        ``dtype`` is the moment dtype; other dtypes are converted once and cached until the next
        snapshot."""
        if dtype == self.mean.dtype:
            std = torch.div(self.sum_sq_dev, self.num_snapshots, out=self.scratch).sqrt_()
            return self.mean, std
        if dtype not in self._sampling_cache:
            std = (self.sum_sq_dev / self.num_snapshots).sqrt_().to(dtype)
            self._sampling_cache[dtype] = (self.mean.to(dtype), std)
        return self._sampling_cache[dtype]

    def draw(
        self,
        num_samples: int,
        scale: float,
        seed: int,
        first_sample: int,
        dtype: torch.dtype,
        spans: Sequence[Span],
        num_params: int,
        low_rank: bool,
    ) -> Tensor:
        """Samples ``first_sample …`` of the seed's table, local columns ``[num_samples, num_local]``.

        ``spans`` place the local columns in the global vector of ``num_params`` columns, so the
        numbers are those of the unsharded posterior's samples. ``low_rank``: add the deviation rows'
        term (SWAG, when ``k >= 2``) or not (SWAG-Diagonal); the diagonal noise is the same either
        way. Computed in float64 for float64 results, in float32 otherwise.
        """
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        mean, std = self.sampling_moments(compute_dtype)
        if scale == 0:
            return mean.expand(num_samples, -1).clone()
        device = self.mean.device
        noise = StandardNormalTiles(seed, num_params, self.rank, device)
        samples = torch.empty(num_samples, self.mean.numel(), dtype=compute_dtype, device=device)
        for local, start, count in spans:  # global columns: the same numbers whatever the sharding
            noise.diagonal(samples[:, local : local + count], first_sample, start)
        root = math.sqrt(scale)
        torch.addcmul(mean, samples, std, value=root, out=samples)  # θ̄ + √scale·√var ⊙ z₁, one pass
        if low_rank and self.rank >= 2:
            z2 = noise.low_rank(first_sample, num_samples).to(compute_dtype)
            self._add_low_rank(samples, z2, root)
        return samples

    def _add_low_rank(self, samples: Tensor, z2: Tensor, root_scale: float) -> None:
        """``samples += √scale · z₂ D̂ / √(k − 1)``, converting the deviations in column blocks only when
        their dtype differs from the samples'."""
        k = self.rank
        deviations = self.deviations[:k]  # rows of the ring in any order give the same D̂ᵀD̂
        alpha = root_scale / math.sqrt(k - 1)
        if deviations.dtype == samples.dtype:
            samples.addmm_(z2, deviations, alpha=alpha)
            return
        for start in range(0, samples.shape[1], DEVIATION_COLUMNS_PER_CONVERSION):
            cols = slice(start, start + DEVIATION_COLUMNS_PER_CONVERSION)
            samples[:, cols].addmm_(z2, deviations[:, cols].to(samples.dtype), alpha=alpha)
