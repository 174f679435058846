"""The ``Posterior`` protocol: what the predictives need of a distribution over a model's weights.

Any object with these two members can be passed to ``SWAGModule(model, posterior=...)`` (or
``BMA``) and works with the sampled predictive, the split path, the prediction writer and
``trainer.test``; nothing has to inherit from a class of the package:

* ``param_shapes``: ordered ``{canonical name: shape}`` of the parameters the posterior covers
  (names as ``model.named_parameters()`` gives them, without the segments wrappers insert, see
  :func:`~lightning_swag.posterior.parameters.canonical_name`); the model's other parameters keep
  their own values in every sample.
* ``sample_weights(num_samples, *, seed, first_sample, scale, dtype, device)``: samples
  ``first_sample … first_sample + num_samples − 1`` of the seed's sequence, as
  ``{name: [num_samples, *shape]}``. Sample ``i`` of a seed must be the same however the samples
  are chunked (``first_sample`` and ``num_samples`` vary with the chunking): that is how a run keeps
  its samples fixed across batches, chunk sizes and processes. ``scale`` is the covariance scale
  (``SWAGModule(scale=...)``, ``tune_scale``; ``0`` should give the posterior's centre where it has
  one); a posterior without a covariance (a deep ensemble) may ignore it. ``dtype`` (``None``: any)
  and ``device`` are where the consumer wants the tensors; it casts them to each parameter's dtype.

Optional members, used where they exist: ``check_compatible(model)`` (default:
:func:`check_fits`), ``layout`` and ``sharded_like(model)`` (how a sharded posterior is split
across processes, default: the whole vector on every process, see :func:`layout_of` and
:func:`sharded_for`), ``num_snapshots`` (``0``: nothing to sample yet), ``diagonal()`` (the
posterior without its low-rank term, for ``covariance="diagonal"``, see :func:`diagonal_of`) and the
:class:`GaussianPosterior` members that ``predictive="linearized"`` needs (see :func:`gaussian_of`).
:class:`~lightning_swag.posterior.swag.SWAGPosterior` implements all of them. Plain torch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_swag.posterior.parameters import check_compatible
from lightning_swag.posterior.sharding import Layout, WholeLayout

__all__ = [
    "GaussianPosterior",
    "Posterior",
    "check_fits",
    "check_posterior",
    "diagonal_of",
    "gaussian_of",
    "layout_of",
    "num_weights",
    "sharded_for",
    "unflatten",
]


@runtime_checkable
class Posterior(Protocol):
    """A distribution over named weights that draws reproducible samples (see the module docstring)."""

    @property
    def param_shapes(self) -> Mapping[str, torch.Size]:
        """Ordered ``{canonical parameter name: shape}`` of the weights the posterior covers."""
        ...

    def sample_weights(
        self,
        num_samples: int,
        *,
        seed: int,
        first_sample: int,
        scale: float,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> dict[str, Tensor]:
        """Samples ``first_sample …`` of ``seed`` as ``{name: [num_samples, *shape]}``, the same sample
        for the same ``(seed, index)`` whatever the chunking."""
        ...


class GaussianPosterior(Posterior, Protocol):
    """A :class:`Posterior` that is a Gaussian ``N(mean, scale · (diag(variance) + FᵀF))``: what
    ``predictive="linearized"`` needs (flat vectors over the ``param_shapes`` in order, ``P`` weights).
    Check an object with :func:`gaussian_of` (``isinstance`` would evaluate ``mean``)."""

    @property
    def mean(self) -> Tensor:
        """The centre as a flat ``[P]`` vector."""
        ...

    def covariance_factors(self) -> tuple[Tensor, Tensor | None]:
        """``(variance [P], F [r, P] or None)``: the covariance at ``scale = 1`` is ``diag(variance) + FᵀF``."""
        ...


def check_posterior(value: Any, what: str = "posterior") -> Posterior:
    """``value`` when it implements :class:`Posterior`; a ``TypeError`` that says what is missing else."""
    if isinstance(value, Posterior):
        return value
    missing = [name for name in ("param_shapes", "sample_weights") if not hasattr(value, name)]
    raise TypeError(
        f"{what} is a {type(value).__name__}, which is not a posterior: it lacks {', '.join(missing)}. Pass a "
        "SWAGPosterior, or an object with param_shapes ({name: shape}) and sample_weights(num_samples, *, "
        "seed, first_sample, scale, dtype, device) (see lightning_swag.posterior.protocol)."
    )


def num_weights(post: Posterior) -> int:
    """``P``: the number of weights ``post`` covers."""
    return sum(math.prod(shape) for shape in post.param_shapes.values())


def layout_of(post: Posterior) -> Layout:
    """How ``post`` is split across processes: its own ``layout`` (a sharded SWAG posterior's), else
    the whole vector on every process."""
    layout = getattr(post, "layout", None)
    return layout if isinstance(layout, Layout) else WholeLayout(post.param_shapes)


def check_fits(post: Posterior, model: nn.Module) -> None:
    """Raise a ``ValueError`` naming the mismatch when ``model`` lacks a parameter of ``post`` (by
    name and shape): ``post.check_compatible(model)`` where it has one."""
    own = getattr(post, "check_compatible", None)
    if callable(own):
        own(model)
    else:
        check_compatible({name: torch.Size(shape) for name, shape in post.param_shapes.items()}, model)


def sharded_for(post: Posterior, model: nn.Module) -> Posterior:
    """``post`` as ``model``'s strategy runs it: ``post.sharded_like(model)`` where it has one (an
    FSDP2 model gets its part of a SWAG posterior), else ``post``."""
    sharded_like = getattr(post, "sharded_like", None)
    return sharded_like(model) if callable(sharded_like) else post


def diagonal_of(post: Posterior, what: str = "posterior") -> Posterior:
    """``post.diagonal()``, the posterior without its low-rank term (``covariance="diagonal"``);
    a ``ValueError`` for a posterior that has no such structure."""
    diagonal = getattr(post, "diagonal", None)
    if not callable(diagonal):
        raise ValueError(
            f"covariance='diagonal' needs a posterior with a diagonal() method (SWAGPosterior has one), but "
            f"{what} is a {type(post).__name__}, which has none. Use covariance='low_rank' (which samples "
            "the posterior as it is), or give the posterior a diagonal() method."
        )
    return diagonal()


def gaussian_of(post: Posterior, what: str = "posterior") -> GaussianPosterior:
    """``post`` when it is a :class:`GaussianPosterior` (checked without evaluating its members); a
    ``ValueError`` naming ``predictive='sampled'`` else."""
    missing = [name for name in ("mean", "covariance_factors") if not _has(post, name)]
    if missing:
        raise ValueError(
            f"predictive='linearized' needs a Gaussian posterior (a mean and covariance_factors(), as "
            f"SWAGPosterior has), but {what} is a {type(post).__name__} without {' and '.join(missing)}. Use "
            "predictive='sampled', which averages over the posterior's weight samples."
        )
    return post  # type: ignore[return-value]


def _has(obj: Any, name: str) -> bool:
    try:
        inspect.getattr_static(obj, name)
    except AttributeError:
        return False
    return True


def unflatten(param_shapes: Mapping[str, Sequence[int]], flat: Tensor) -> dict[str, Tensor]:
    """Split a flat ``[..., P]`` vector into ``{name: [..., *shape]}`` views, in ``param_shapes`` order."""
    return WholeLayout(param_shapes).unflatten_local(flat)
