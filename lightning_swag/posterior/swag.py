"""``SWAGPosterior``: the SWAG posterior over a model's weights, in plain PyTorch (no Lightning inside).

SWAG (Maddox et al., 2019) fits a Gaussian to the weights visited by SGD:

* the SWA mean ``θ̄ = (1/n) Σ θ_i``,
* the diagonal variance ``(1/n) Σ (θ_i − θ̄)²``,
* a low-rank covariance ``D̂ᵀD̂ / (k − 1)`` from the last ``k`` deviations ``θ_i − θ̄_i``.

Samples are ``θ̄ + √scale · (√var ⊙ z₁ + D̂ᵀz₂ / √(k − 1))`` with ``z₁ ~ N(0, I_P)`` and
``z₂ ~ N(0, I_k)``, so their covariance is ``scale · (diag(var) + D̂ᵀD̂ / (k − 1))``; ``scale = 0.5``
is the paper's ``1/√2`` applied to both terms.

This class is a small facade. The pieces it joins each live in one module:
:mod:`~lightning_swag.posterior.parameters` (which parameters, by name), :mod:`~lightning_swag.posterior.statistics`
(Welford moments, the deviation ring, sampling), :mod:`~lightning_swag.posterior.noise` (the noise table),
:mod:`~lightning_swag.posterior.sharding` (which part of the weights this process keeps) and
:mod:`~lightning_swag.posterior.format` (the stored format).

Memory (see :attr:`nbytes`): ``P`` tracked parameters and rank ``K`` take ``2·P`` moment
elements (float64 by default, 16·P bytes), ``K·P`` deviation elements (float32 by default,
4·K·P bytes) and one ``P`` scratch vector in the moment dtype; sampling in float32 adds a cached
float32 mean and standard deviation (8·P bytes).

Sharded posteriors: ``param_shapes``, ``num_params`` and :meth:`check_compatible` keep their global
meaning, while :attr:`mean`, :attr:`variance`, :attr:`deviations`, :meth:`covariance_factors` and
:attr:`nbytes` are this process's part (``num_local_params`` columns, in the order of
``layout.pieces``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_swag.posterior.noise import StandardNormalTiles, derive_seed
from lightning_swag.posterior.parameters import (
    canonical_name,
    check_compatible,
    named_tracked,
    select_parameters,
    unwrap_model,
)
from lightning_swag.posterior.sampling import PosteriorSampling
from lightning_swag.posterior.sharding import (
    Layout,
    WholeLayout,
    layout_for,
)
from lightning_swag.posterior.statistics import SWAGStatistics
from lightning_swag.posterior.storage import PosteriorStorage

__all__ = [
    "SWAGPosterior",
    "StandardNormalTiles",
    "canonical_name",
    "derive_seed",
    "select_parameters",
    "unwrap_model",
]


class SWAGPosterior(PosteriorSampling, PosteriorStorage):
    """Running SWAG moments and deviation buffer for a fixed set of named parameters.

    Statistics are kept for a flat vector of the tracked parameters, concatenated in
    ``model.parameters()`` order (the order of ``torch.nn.utils.parameters_to_vector``). Parameters
    are matched by **name**, never by position, so a posterior can only be applied to a model with
    the same names and shapes. The moments are updated with Welford's method, so the variance keeps
    its precision even in float32.

    Args:
        param_shapes: ordered ``{name: shape}`` of the tracked parameters. Use :meth:`from_model`
            to build it from a network.
        max_rank: number of deviation columns kept (``K``); ``0`` gives SWAG-Diagonal.
        moment_dtype: dtype of the mean and the sum of squared deviations.
        deviation_dtype: dtype of the deviation buffer.
        device: where statistics live (e.g. ``"cpu"`` to keep them off the GPU).
        layout: keep only this process's part of the weights (a sharded posterior, see
            :mod:`lightning_swag.posterior.sharding`); ``None`` keeps all of them. :meth:`from_model` picks it.

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
        layout: Layout | None = None,
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
        self._layout = layout if layout is not None else WholeLayout(self.param_shapes)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._stats = SWAGStatistics(self._layout.num_local, max_rank, moment_dtype, deviation_dtype, device)

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
        """An empty posterior for ``model``'s trainable parameters (or those ``include`` selects, see
        :func:`~lightning_swag.posterior.parameters.select_parameters`).

        ``device`` defaults to the device of the model's first tracked parameter. Parameters sharded
        by FSDP2's ``fully_shard`` (DTensors) give a posterior of this process's shards;
        ``shard=True`` with plain parameters and several processes (DDP) keeps a ``1/world_size``
        slice of the weights on each process.
        """
        selected = select_parameters(model, include)
        lazy = [n for n, p in selected if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ValueError(
                f"Parameters {lazy[:5]} of {type(model).__name__} are not initialized yet (lazy modules "
                "such as nn.LazyLinear learn their shape at the first forward pass). Run one forward pass "
                "before building the posterior."
            )
        return cls(
            {n: p.shape for n, p in selected},
            max_rank,
            moment_dtype=moment_dtype,
            deviation_dtype=deviation_dtype,
            device=device if device is not None else selected[0][1].device,
            layout=layout_for(selected, shard),
        )

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self._stats.mean.device

    @property
    def moment_dtype(self) -> torch.dtype:
        return self._stats.mean.dtype

    @property
    def deviation_dtype(self) -> torch.dtype:
        return self._stats.deviations.dtype

    @property
    def param_names(self) -> list[str]:
        return list(self.param_shapes)

    @property
    def num_snapshots(self) -> int:
        """How many weight snapshots have been collected."""
        return self._stats.num_snapshots

    @property
    def rank(self) -> int:
        """Number of filled deviation rows, ``k = min(num_snapshots, max_rank)``."""
        return self._stats.rank

    @property
    def layout(self) -> Layout:
        """The part of the weights this process keeps (a :class:`~lightning_swag.posterior.sharding.WholeLayout`
        when it keeps all of them)."""
        return self._layout

    @property
    def is_sharded(self) -> bool:
        """Whether this process keeps only a part of the weights' statistics."""
        return self._layout.is_sharded

    @property
    def num_local_params(self) -> int:
        """Columns of the statistics this process keeps (``num_params`` when unsharded)."""
        return self._layout.num_local

    @property
    def local_ranges(self) -> list[tuple[int, int]]:
        """The global ``[start, end)`` ranges of the flat weight vector kept here, in local order."""
        return [(start, start + count) for _, start, count in self._layout.spans]

    @property
    def statistics(self) -> SWAGStatistics:
        """The running statistics themselves (this process's columns): ``mean``, ``sum_sq_dev``, the
        ``deviations`` ring and the ``scratch`` vector, updated in place by :meth:`collect`."""
        return self._stats

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics on their device (moments, scratch, deviation buffer and any
        cached float32 sampling moments); for a sharded posterior, this process's."""
        return sum(t.numel() * t.element_size() for t in self._stats.tensors)

    @property
    def mean(self) -> Tensor:
        """The SWA weights ``θ̄`` as a flat ``[P]`` tensor (a copy; sharded: this process's part)."""
        self._require_snapshots("mean")
        return self._stats.mean.clone()

    @property
    def variance(self) -> Tensor:
        """Diagonal variance ``(1/n) Σ (θ_i − θ̄)²`` (the population variance of the snapshots)."""
        self._require_snapshots("variance")
        return self._stats.variance()

    @property
    def second_moment(self) -> Tensor:
        """``E[θ²] = var + θ̄²`` as a flat ``[P]`` tensor."""
        return self.variance + self._stats.mean.square()

    @property
    def deviations(self) -> Tensor:
        """The ``[k, P]`` deviation rows ``θ_i − θ̄_i``, oldest first (a copy)."""
        return self._stats.ordered_deviations()

    def __repr__(self) -> str:
        sharded = f", sharded={self._layout.describe()}" if self.is_sharded else ""
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
        named = (
            named_tracked(model)
            if isinstance(model, nn.Module)
            else {canonical_name(n): t for n, t in model.items()}
        )
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
        with torch.no_grad():
            targets = [view.reshape(-1) for view in self._layout.piece_views(self._stats.scratch)]
            torch._foreach_copy_(targets, self._layout.sources(named))
            self._add_scratch()

    def collect_flat(self, theta: Tensor) -> None:
        """Add a snapshot given as a flat ``[P]`` vector (tracked parameters concatenated; a sharded
        posterior keeps its part of it)."""
        if theta.dim() != 1 or theta.numel() != self.num_params:
            raise ValueError(
                f"Expected a flat vector of {self.num_params} weights, got shape {tuple(theta.shape)}."
            )
        with torch.no_grad():
            self._stats.scratch.copy_(self._layout.take(theta))
            self._add_scratch()

    def _add_scratch(self) -> None:
        scratch = self._stats.scratch
        if not bool(torch.isfinite(scratch).all()):
            views = self._layout.piece_views(scratch)
            bad = [
                p.name
                for p, v in zip(self._layout.pieces, views, strict=True)
                if not bool(torch.isfinite(v).all())
            ]
            raise FloatingPointError(
                f"Snapshot {self.num_snapshots + 1} has NaN or infinite weights in {', '.join(dict.fromkeys(bad))}; "
                "it was not added to the posterior. Lower the learning rate or clip gradients."
            )
        self._stats.add_scratch()

    # ------------------------------------------------------------------ model I/O
    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``[..., P]`` vector into ``{name: tensor[..., *shape]}`` views."""
        if flat.shape[-1] != self.num_params:
            raise ValueError(
                f"Expected a last dimension of {self.num_params}, got shape {tuple(flat.shape)}."
            )
        return WholeLayout(self.param_shapes).unflatten_local(flat)

    def unflatten_local(self, flat: Tensor) -> dict[str, Tensor]:
        """Split this process's columns ``[..., num_local_params]`` into ``{name: [..., *local shape]}``
        views: for FSDP2 shards, the shapes of the parameters' local shards (``param.to_local()``)."""
        return self._layout.unflatten_local(flat)

    def load_into(self, model: nn.Module, flat: Tensor | None = None) -> nn.Module:
        """Write ``flat`` (default: the SWA mean) into the tracked parameters of ``model``, in place.

        A posterior of FSDP2 shards writes this process's columns (``flat``: ``[num_local_params]``)
        into the local shards of the (sharded) model.

        Raises:
            ValueError: ``model`` does not fit, or its parameters are on the meta device (they hold
                no storage to write into: materialise them first, e.g. ``model.to_empty(device=...)``).
        """
        self.check_compatible(model)
        meta = [n for n, p in named_tracked(model).items() if n in self.param_shapes and p.is_meta]
        if meta:
            raise ValueError(
                f"{type(model).__name__}'s parameters {meta[:3]} are on the meta device, so there is nothing to "
                "write the weights into; materialise the model first (model.to_empty(device='cpu')), then call "
                "load_into."
            )
        self._layout.write_into(model, self._stats.mean if flat is None else flat)
        return model

    def check_compatible(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` that names the mismatch when ``model`` does not fit this posterior."""
        check_compatible(self.param_shapes, model)

    def to(self, device: torch.device | str) -> SWAGPosterior:
        """Move the statistics to ``device`` (in place) and return ``self``."""
        self._stats.to(torch.device(device))
        return self

    # ------------------------------------------------------------------ helpers
    def _require_snapshots(self, what: str) -> None:
        if self.num_snapshots == 0:
            raise RuntimeError(
                f"The SWAG posterior holds no snapshots yet, so it has no {what}. Collect weights first "
                "(SWAGCallback during trainer.fit, or SWAGPosterior.collect), and check that training "
                "reached the callback's start_epoch."
            )
