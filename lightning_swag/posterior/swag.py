"""``SWAGPosterior``: the SWAG posterior over a model's weights, in plain PyTorch (no Lightning inside).

SWAG (Maddox et al., 2019) fits a Gaussian to the weights visited by SGD:

* the SWA mean ``θ̄ = (1/n) Σ θ_i``,
* the diagonal variance ``(1/n) Σ (θ_i − θ̄)²``,
* a low-rank covariance ``D̂ᵀD̂ / (k − 1)`` from the last ``k`` deviations ``θ_i − θ̄_i``.

Samples are ``θ̄ + √scale · (√var ⊙ z₁ + D̂ᵀz₂ / √(k − 1))`` with ``z₁ ~ N(0, I_P)`` and
``z₂ ~ N(0, I_k)``, so their covariance is ``scale · (diag(var) + D̂ᵀD̂ / (k − 1))``; ``scale = 0.5``
is the paper's ``1/√2`` applied to both terms.

This class composes collaborators, each in one module: :mod:`~lightning_swag.posterior.parameters`
(which parameters, by name), :mod:`~lightning_swag.posterior.statistics` (Welford moments, the
deviation ring, drawing), :mod:`~lightning_swag.posterior.sampling` (the sampling arguments and seed),
:mod:`~lightning_swag.posterior.noise` (the noise table), :mod:`~lightning_swag.posterior.sharding`
(which part of the weights this process keeps), :mod:`~lightning_swag.posterior.storage` (state dicts,
files, gathering) and :mod:`~lightning_swag.posterior.format` (the stored format). It implements the
:class:`~lightning_swag.posterior.protocol.Posterior` protocol; :meth:`SWAGPosterior.diagonal` gives
its SWAG-Diagonal view (:class:`~lightning_swag.posterior.diagonal.SWAGDiagonal`).

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

from lightning_swag.checks import check_int
from lightning_swag.posterior import storage
from lightning_swag.posterior.diagonal import SWAGDiagonal
from lightning_swag.posterior.parameters import (
    canonical_name,
    check_compatible,
    named_tracked,
    select_parameters,
)
from lightning_swag.posterior.sampling import draw_local, refuse_sharded
from lightning_swag.posterior.sharding import Layout, WholeLayout, layout_for
from lightning_swag.posterior.statistics import SWAGStatistics

__all__ = ["SWAGPosterior"]


class SWAGPosterior:
    """Running SWAG moments and deviation buffer for a fixed set of named parameters.

    Statistics are kept for the flat vector of the tracked parameters in ``model.parameters()`` order,
    matched by **name** (a posterior applies only to a model with the same names and shapes), with
    Welford's updates (the variance keeps its precision even in float32).

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
        check_int("max_rank", max_rank, 0)
        _check_dtypes(moment_dtype=moment_dtype, deviation_dtype=deviation_dtype)
        shapes = _canonical_shapes(param_shapes)
        num_local = layout.num_local if layout is not None else sum(math.prod(s) for s in shapes.values())
        device = torch.device(device) if device is not None else torch.device("cpu")
        stats = SWAGStatistics(num_local, max_rank, moment_dtype, deviation_dtype, device)
        self._attach(shapes, stats, layout)

    def _attach(self, shapes: dict[str, torch.Size], stats: SWAGStatistics, layout: Layout | None) -> None:
        self.param_shapes: dict[str, torch.Size] = shapes
        self.param_numels: list[int] = [math.prod(s) for s in shapes.values()]
        self.num_params = sum(self.param_numels)
        self.max_rank = stats.max_rank
        self._layout = _checked_layout(shapes, stats, layout)
        self._stats = stats
        self.is_sharded: bool = self._layout.is_sharded
        """Whether this process keeps only a part of the weights' statistics."""
        self.num_local_params: int = self._layout.num_local
        """Columns of the statistics this process keeps (``num_params`` when unsharded)."""

    @classmethod
    def from_statistics(
        cls,
        param_shapes: Mapping[str, Sequence[int]],
        statistics: SWAGStatistics,
        layout: Layout | None = None,
    ) -> SWAGPosterior:
        """A posterior over ``statistics`` (used as they are, not copied): the columns of ``layout``
        (default: all of ``param_shapes``), e.g. statistics read from a file or gathered."""
        post = cls.__new__(cls)
        post._attach(_canonical_shapes(param_shapes), statistics, layout)
        return post

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
        selected = _initialized(select_parameters(model, include), model)
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
        """Where the statistics live."""
        return self._stats.mean.device

    @property
    def moment_dtype(self) -> torch.dtype:
        """The dtype of the mean and of the sum of squared deviations."""
        return self._stats.mean.dtype

    @property
    def deviation_dtype(self) -> torch.dtype:
        """The dtype of the deviation rows."""
        return self._stats.deviations.dtype

    @property
    def param_names(self) -> list[str]:
        """The tracked parameters' canonical names, in order."""
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
        self._stats.require_snapshots("mean")
        return self._stats.mean.clone()

    @property
    def variance(self) -> Tensor:
        """Diagonal variance ``(1/n) Σ (θ_i − θ̄)²`` (the population variance of the snapshots)."""
        self._stats.require_snapshots("variance")
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
        named = _snapshot(self.param_shapes, model)
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
        _check_finite(self._stats.scratch, self._layout, self.num_snapshots + 1)
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
        """Write ``flat`` (default: the SWA mean) into the tracked parameters of ``model``, in place (a
        posterior of FSDP2 shards writes this process's ``[num_local_params]`` into the local shards).

        Raises:
            ValueError: ``model`` does not fit, or its parameters are on the meta device (materialise
                them first, e.g. ``model.to_empty(device=...)``).
        """
        self.check_compatible(model)
        _refuse_meta(model, self.param_shapes)
        self._layout.write_into(model, self._stats.mean if flat is None else flat)
        return model

    def check_compatible(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` that names the mismatch when ``model`` does not fit this posterior."""
        check_compatible(self.param_shapes, model)

    def to(self, device: torch.device | str) -> SWAGPosterior:
        """Move the statistics to ``device`` (in place) and return ``self``."""
        self._stats.to(torch.device(device))
        return self

    # ------------------------------------------------------------------ sampling
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
        """Draw flat weight vectors ``[num_samples, P]`` from the SWAG Gaussian.

        The noise of a seed is a fixed table addressed by sample index and column
        (:class:`~lightning_swag.posterior.noise.StandardNormalTiles`), so sample ``i`` of a seed (an int
        >= 0; else drawn from ``generator`` or the global RNG, never reseeded) is the same whether it is
        drawn alone or with others (``first_sample``: the index of the first), in any chunking.
        ``scale``: the covariance scale (``0.5``: the paper's ``1/√2`` on the std; ``0``: the SWA mean).
        ``dtype`` (default: the moment dtype; float64 is computed in float64, others in float32) and
        ``device`` (default: the posterior's) of the result. SWAG-Diagonal: :meth:`diagonal`. A sharded
        posterior refuses (use :meth:`sample_local`, or :meth:`gather` first).
        """
        refuse_sharded(self._layout)
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
        """This process's columns ``[num_samples, num_local_params]`` of the samples :meth:`sample`
        draws (all columns when unsharded), with the same arguments.

        Every process draws its own columns of the seed's noise table and the same low-rank noise, so
        the parts joined by columns (:func:`~lightning_swag.posterior.sharding.all_gather_columns`) are the
        samples of the unsharded posterior, whatever the sharding. No communication. A sharded
        posterior needs ``seed``, the same on every process.
        """
        return draw_local(
            self._stats, self._layout, num_samples, scale, generator,
            seed=seed, first_sample=first_sample, dtype=dtype, device=device, low_rank=True,
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
        """The :class:`~lightning_swag.posterior.protocol.Posterior` protocol: :meth:`sample_local` as
        ``{name: [num_samples, *shape]}`` for this process's model (FSDP2: the local shards; a DDP
        slice joins every process's columns, a collective)."""
        local = self.sample_local(
            num_samples, scale, seed=seed, first_sample=first_sample, dtype=dtype, device=device
        )
        return self._layout.model_tensors(local)

    def covariance_factors(self) -> tuple[Tensor, Tensor | None]:
        """``(variance, D̂ / √(k−1))`` so that the covariance is ``diag(var) + LᵀL`` (``L`` is None
        when ``k < 2``; it keeps the deviations' dtype, so no copy of them is made in another)."""
        variance = self.variance
        k = self.rank
        if k < 2:
            return variance, None
        return variance, self.deviations.div_(math.sqrt(k - 1))  # ``deviations`` is a copy: in place

    def diagonal(self) -> SWAGDiagonal:
        """SWAG-Diagonal: a read-only view of this posterior (sharing its statistics, so it follows
        later snapshots) with the same mean and variance and no low-rank term. Its samples of a seed
        are this posterior's without the deviation rows' term."""
        return SWAGDiagonal(self)

    # ------------------------------------------------------------------ stored form: plain functions over public members
    state_dict = storage.state_dict
    load_state_dict = storage.load_state_dict
    from_state_dict = classmethod(storage.from_state_dict)
    sharded_like = storage.sharded_like
    save = storage.save
    load = classmethod(storage.load)
    gather = storage.gather
    sharded_state_dict = storage.sharded_state_dict
    sharded_description = storage.sharded_description
    from_distributed_checkpoint = classmethod(storage.from_distributed_checkpoint)
    from_sharded_entries = classmethod(storage.from_sharded_entries)


def _initialized(
    selected: list[tuple[str, nn.Parameter]], model: nn.Module
) -> list[tuple[str, nn.Parameter]]:
    lazy = [n for n, p in selected if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"Parameters {lazy[:5]} of {type(model).__name__} are not initialized yet (lazy modules "
            "such as nn.LazyLinear learn their shape at the first forward pass). Run one forward pass "
            "before building the posterior."
        )
    return selected


def _check_dtypes(**dtypes: torch.dtype) -> None:
    for name, dtype in dtypes.items():
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating torch.dtype, got {dtype!r}.")


def _checked_layout(shapes: dict[str, torch.Size], stats: SWAGStatistics, layout: Layout | None) -> Layout:
    """``layout`` (default: the whole vector) when it describes ``shapes`` and the columns of ``stats``."""
    if layout is not None and layout.shapes != shapes:
        raise ValueError("layout does not describe these parameters (other names or shapes).")
    layout = layout if layout is not None else WholeLayout(shapes)
    if stats.mean.numel() != layout.num_local:
        raise ValueError(f"The statistics hold {stats.mean.numel()} columns, the layout {layout.num_local}.")
    return layout


def _canonical_shapes(param_shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Size]:
    if not param_shapes:
        raise ValueError("param_shapes is empty: a posterior needs at least one parameter.")
    return {canonical_name(n): torch.Size(s) for n, s in param_shapes.items()}


def _snapshot(
    param_shapes: Mapping[str, torch.Size], model: nn.Module | Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``{canonical name: tensor}`` of ``model`` (a module or a map), checked against ``param_shapes``."""
    named: dict[str, Tensor] = (
        dict(named_tracked(model))
        if isinstance(model, nn.Module)
        else {canonical_name(n): t for n, t in model.items()}
    )
    for name, shape in param_shapes.items():
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
    return named


def _check_finite(scratch: Tensor, layout: Layout, snapshot: int) -> None:
    """A ``FloatingPointError`` naming the parameters when the snapshot in ``scratch`` is not finite."""
    if bool(torch.isfinite(scratch).all()):
        return
    views = layout.piece_views(scratch)
    bad = [p.name for p, v in zip(layout.pieces, views, strict=True) if not bool(torch.isfinite(v).all())]
    raise FloatingPointError(
        f"Snapshot {snapshot} has NaN or infinite weights in {', '.join(dict.fromkeys(bad))}; "
        "it was not added to the posterior. Lower the learning rate or clip gradients."
    )


def _refuse_meta(model: nn.Module, param_shapes: Mapping[str, torch.Size]) -> None:
    meta = [n for n, p in named_tracked(model).items() if n in param_shapes and p.is_meta]
    if meta:
        raise ValueError(
            f"{type(model).__name__}'s parameters {meta[:3]} are on the meta device, so there is nothing to "
            "write the weights into; materialise the model first (model.to_empty(device='cpu')), then call "
            "load_into."
        )
