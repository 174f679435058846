"""Drawing weight samples from a posterior: the public sampling API of :class:`~lightning_swag.SWAGPosterior`.

The numbers come from :meth:`SWAGStatistics.draw <lightning_swag.posterior.statistics.SWAGStatistics.draw>`
over the noise table of a seed (:mod:`lightning_swag.posterior.noise`); this class checks the arguments and
says what a sharded posterior can draw. Plain torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_swag.checks import check_int, check_scale, check_seed

if TYPE_CHECKING:
    from lightning_swag.posterior.sharding import Layout
    from lightning_swag.posterior.statistics import SWAGStatistics

__all__ = ["PosteriorSampling"]


class PosteriorSampling:
    """Samples and covariance factors of a posterior (see the module docstring)."""

    num_params: int
    _layout: Layout
    _stats: SWAGStatistics

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

        The noise of a seed is a fixed table addressed by sample index and column
        (:class:`~lightning_swag.posterior.noise.StandardNormalTiles`), so sample ``i`` of a seed is the same
        whether it is drawn alone or with others, in any chunking.

        Args:
            num_samples: how many weight vectors.
            scale: covariance scale; ``0.5`` is the paper's ``1/√2`` on the standard deviation.
                ``0`` returns the SWA mean.
            generator: a random source to draw the seed from when ``seed`` is not given. Without
                both, the global RNG supplies the seed; it is never reseeded.
            seed: the seed of the samples (an int >= 0); exclusive with ``generator``.
            first_sample: index of the first sample in the seed's sequence.
            diagonal_only: ignore the low-rank term (SWAG-Diagonal).
            dtype: dtype of the result (default: the moment dtype). Float64 results are computed in
                float64, others in float32 from cached float32 moments.
            device: where to put the result (default: the posterior's device).

        Raises:
            ValueError: the posterior is sharded (use :meth:`sample_local`, or :meth:`gather` first).
        """
        if self.is_sharded:
            raise ValueError(
                f"This posterior is sharded ({self._layout.describe()} on this process), so it cannot draw "
                "whole weight vectors: draw this process's part with sample_local(..., seed=s) (the same s on "
                "every process), or join the parts with gather() / save() first."
            )
        return self.sample_local(
            num_samples, scale, generator, seed=seed, first_sample=first_sample,
            diagonal_only=diagonal_only, dtype=dtype, device=device,
        )  # fmt: skip

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
        the parts joined by columns (:func:`~lightning_swag.posterior.sharding.all_gather_columns`) are the
        samples of the unsharded posterior, whatever the sharding. No communication. A sharded
        posterior needs ``seed``, the same on every process.
        """
        if self.is_sharded and seed is None:
            raise ValueError(
                "sample_local of a sharded posterior needs seed=<int>, the same on every process: the "
                "processes' parts only form one sample when they come from the same noise table."
            )
        check_int("num_samples", num_samples, 1)
        scale = check_scale(scale)
        check_int("first_sample", first_sample, 0)
        self._require_snapshots("sample")
        seed = self._resolve_seed(seed, generator)
        out_dtype = dtype or self.moment_dtype
        samples = self._stats.draw(
            num_samples,
            scale,
            seed,
            first_sample,
            diagonal_only,
            out_dtype,
            self._layout.spans,
            self.num_params,
        )
        return samples.to(dtype=out_dtype, device=device or self.device)

    @staticmethod
    def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
        if seed is not None:
            if generator is not None:
                raise ValueError("Give either seed or generator, not both.")
            check_seed(seed, allow_none=False)
            return seed
        draw = torch.randint(
            0, 2**62, (1,), generator=generator, device=generator.device if generator else None
        )
        return int(draw.item())

    def covariance_factors(self, diagonal_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(variance, D̂ / √(k−1))`` so that the covariance is ``diag(var) + LᵀL`` (``L`` may be None)."""
        variance = self.variance
        k = self.rank
        if diagonal_only or k < 2:
            return variance, None
        return variance, self.deviations.to(variance.dtype) / math.sqrt(k - 1)
