"""Drawing weight samples from SWAG statistics: the argument checks and the seed, shared by
:class:`~lightning_swag.posterior.swag.SWAGPosterior` and its SWAG-Diagonal view
:class:`~lightning_swag.posterior.diagonal.SWAGDiagonal`.

The numbers come from :meth:`SWAGStatistics.draw <lightning_swag.posterior.statistics.SWAGStatistics.draw>`
over the noise table of a seed (:mod:`lightning_swag.posterior.noise`). Plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_swag.checks import check_int, check_scale, check_seed
from lightning_swag.posterior.sharding import Layout
from lightning_swag.posterior.statistics import SWAGStatistics

__all__ = ["draw_local", "refuse_sharded", "resolve_seed"]


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """``seed`` checked, or a seed drawn from ``generator`` (the global RNG without one; never reseeded)."""
    if seed is not None:
        if generator is not None:
            raise ValueError("Give either seed or generator, not both.")
        check_seed(seed, allow_none=False)
        return seed
    draw = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else None)
    return int(draw.item())


def refuse_sharded(layout: Layout) -> None:
    """A ``ValueError`` when ``layout`` keeps only a part of the weights (whole samples need them all)."""
    if layout.is_sharded:
        raise ValueError(
            f"This posterior is sharded ({layout.describe()} on this process), so it cannot draw whole "
            "weight vectors: draw this process's part with sample_local(..., seed=s) (the same s on every "
            "process), or join the parts with gather() / save() first."
        )


def draw_local(
    stats: SWAGStatistics,
    layout: Layout,
    num_samples: int,
    scale: float,
    generator: torch.Generator | None,
    *,
    seed: int | None,
    first_sample: int,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    low_rank: bool,
) -> Tensor:
    """This process's columns ``[num_samples, num_local]`` of samples ``first_sample …`` of the seed
    (see ``SWAGPosterior.sample_local``); ``low_rank=False`` leaves out the deviation rows' term."""
    if layout.is_sharded and seed is None:
        raise ValueError(
            "sample_local of a sharded posterior needs seed=<int>, the same on every process: the "
            "processes' parts only form one sample when they come from the same noise table."
        )
    check_int("num_samples", num_samples, 1)
    scale = check_scale(scale)
    check_int("first_sample", first_sample, 0)
    stats.require_snapshots("sample")
    seed = resolve_seed(seed, generator)
    out_dtype = dtype or stats.mean.dtype
    samples = stats.draw(
        num_samples, scale, seed, first_sample, out_dtype, layout.spans, layout.num_params, low_rank
    )
    return samples.to(dtype=out_dtype, device=device or stats.mean.device)
