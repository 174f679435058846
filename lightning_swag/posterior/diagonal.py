"""``SWAGDiagonal``: SWAG-Diagonal, the SWAG Gaussian without its low-rank term, as a read-only view.

``SWAGPosterior.diagonal()`` returns one. It shares the statistics of its SWAG posterior (no copy, and
it follows later snapshots) and keeps only their diagonal: samples ``θ̄ + √scale · √var ⊙ z₁``, with
``z₁`` read from the same noise table as the full posterior's, so the diagonal sample ``i`` of a seed
is the full posterior's sample ``i`` without the deviation rows' term. It implements the
:class:`~lightning_swag.posterior.protocol.Posterior` and
:class:`~lightning_swag.posterior.protocol.GaussianPosterior` protocols. Plain torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_swag.posterior.sampling import draw_local, refuse_sharded
from lightning_swag.posterior.sharding import Layout

if TYPE_CHECKING:
    from lightning_swag.posterior.swag import SWAGPosterior

__all__ = ["SWAGDiagonal"]


class SWAGDiagonal:
    """The SWAG-Diagonal view of ``source`` (see the module docstring).

    Args:
        source: the SWAG posterior whose mean and variance are used.
    """

    def __init__(self, source: SWAGPosterior) -> None:
        self.source = source

    @property
    def param_shapes(self) -> Mapping[str, torch.Size]:
        """The source's ``{canonical name: shape}``."""
        return self.source.param_shapes

    @property
    def num_params(self) -> int:
        """``P``, the weights covered (all processes together)."""
        return self.source.num_params

    @property
    def num_snapshots(self) -> int:
        """The source's snapshots."""
        return self.source.num_snapshots

    @property
    def rank(self) -> int:
        """``0``: no deviation rows."""
        return 0

    @property
    def layout(self) -> Layout:
        """The part of the weights this process keeps (the source's)."""
        return self.source.layout

    @property
    def is_sharded(self) -> bool:
        """Whether this process keeps only a part of the weights."""
        return self.source.is_sharded

    @property
    def mean(self) -> Tensor:
        """The SWA mean ``θ̄`` (flat, a copy)."""
        return self.source.mean

    @property
    def variance(self) -> Tensor:
        """The diagonal variance (flat)."""
        return self.source.variance

    def __repr__(self) -> str:
        return f"SWAGDiagonal({self.source!r})"

    def check_compatible(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` that names the mismatch when ``model`` does not fit."""
        self.source.check_compatible(model)

    def covariance_factors(self) -> tuple[Tensor, None]:
        """``(variance, None)``: the covariance is ``diag(var)``."""
        return self.source.variance, None

    def diagonal(self) -> SWAGDiagonal:
        """Itself."""
        return self

    def sharded_like(self, model: nn.Module) -> SWAGDiagonal:
        """The diagonal view of ``source.sharded_like(model)``."""
        source = self.source.sharded_like(model)
        return self if source is self.source else SWAGDiagonal(source)

    def sample(
        self,
        num_samples: int,
        scale: float = 0.5,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        first_sample: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Flat weight vectors ``[num_samples, P]``, as ``SWAGPosterior.sample`` without the low-rank term."""
        refuse_sharded(self.layout)
        return self.sample_local(
            num_samples, scale, generator, seed=seed, first_sample=first_sample, dtype=dtype, device=device
        )

    def sample_local(
        self,
        num_samples: int,
        scale: float = 0.5,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        first_sample: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """This process's columns of :meth:`sample` (see ``SWAGPosterior.sample_local``)."""
        return draw_local(
            self.source.statistics, self.layout, num_samples, scale, generator,
            seed=seed, first_sample=first_sample, dtype=dtype, device=device, low_rank=False,
        )  # fmt: skip

    def sample_weights(
        self,
        num_samples: int,
        *,
        seed: int,
        first_sample: int = 0,
        scale: float = 0.5,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Tensor]:
        """The :class:`~lightning_swag.posterior.protocol.Posterior` protocol (see ``SWAGPosterior.sample_weights``)."""
        local = self.sample_local(
            num_samples, scale, seed=seed, first_sample=first_sample, dtype=dtype, device=device
        )
        return self.layout.model_tensors(local)
