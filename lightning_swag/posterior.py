"""The SWAG posterior over a model's weights, in plain PyTorch (no Lightning inside).

SWAG (Maddox et al., 2019) fits a Gaussian to the weights visited by SGD:

* the SWA mean ``θ̄ = (1/n) Σ θ_i``,
* the diagonal variance ``E[θ²] − E[θ]²``,
* a low-rank covariance ``D̂ᵀD̂ / (k − 1)`` from the last ``k`` deviations ``θ_i − θ̄_i``.

Samples are ``θ̄ + √scale · (√var ⊙ z₁ + D̂ᵀz₂ / √(k − 1))`` with ``z₁ ~ N(0, I_P)`` and
``z₂ ~ N(0, I_k)``, so their covariance is ``scale · (diag(var) + D̂ᵀD̂ / (k − 1))``; ``scale = 0.5``
is the paper's ``1/√2`` applied to both terms.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SWAGPosterior", "select_parameters"]

_FORMAT_VERSION = 1
# Columns of the deviation buffer converted to the moment dtype at a time while sampling.
_SAMPLE_BLOCK = 2**18


def select_parameters(
    model: nn.Module, include: Sequence[str] | str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs SWAG tracks, in ``model.parameters()`` order.

    Args:
        model: the network.
        include: ``None`` tracks every parameter with ``requires_grad=True``. Otherwise names or
            shell-style patterns (``"head.*"``, ``"*.weight"``) matched against the parameter
            name; a module name (``"classifier"``) selects all of its parameters.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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


class SWAGPosterior:
    """Running SWAG moments and deviation buffer for a fixed set of named parameters.

    Statistics are kept for a flat vector of the tracked parameters, concatenated in
    ``model.parameters()`` order (the order of ``torch.nn.utils.parameters_to_vector``). Parameters
    are matched by **name**, never by position, so a posterior can only be applied to a model with
    the same names and shapes.

    Memory: ``P`` tracked parameters and rank ``K`` take ``2·P`` moment elements (float64 by
    default, 16·P bytes) plus ``K·P`` deviation elements (float32 by default, 4·K·P bytes) plus one
    ``P`` scratch vector in the moment dtype.

    Args:
        param_shapes: ordered ``{name: shape}`` of the tracked parameters. Use :meth:`from_model`
            to build it from a network.
        max_rank: number of deviation columns kept (``K``); ``0`` gives SWAG-Diagonal.
        moment_dtype: dtype of the mean and second moment (float64 avoids cancellation in
            ``E[θ²] − E[θ]²``).
        deviation_dtype: dtype of the deviation buffer.
        device: where statistics live (e.g. ``"cpu"`` to keep them off the GPU).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> post = SWAGPosterior.from_model(net, max_rank=5)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1)
        ...     post.collect(net)
        >>> post.num_snapshots, post.rank, post.sample(10).shape
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
    ) -> None:
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 0:
            raise ValueError(f"max_rank must be an int >= 0 (0 = SWAG-Diagonal), got {max_rank!r}.")
        if not param_shapes:
            raise ValueError("param_shapes is empty: a posterior needs at least one parameter.")
        for dtype_name, dtype in (("moment_dtype", moment_dtype), ("deviation_dtype", deviation_dtype)):
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"{dtype_name} must be a floating torch.dtype, got {dtype!r}.")
        self.param_shapes: dict[str, torch.Size] = {n: torch.Size(s) for n, s in param_shapes.items()}
        self.param_numels: list[int] = [math.prod(s) for s in self.param_shapes.values()]
        self.num_params = sum(self.param_numels)
        self.max_rank = max_rank
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._mean = torch.zeros(self.num_params, dtype=moment_dtype, device=device)
        self._sq_mean = torch.zeros_like(self._mean)
        self._scratch = torch.empty_like(self._mean)
        self._scratch_views = list(self._split(self._scratch))
        # The ring buffer of deviations: allocated once, row ``n % max_rank`` written by snapshot n.
        self._deviations = torch.zeros(max_rank, self.num_params, dtype=deviation_dtype, device=device)
        self._num_snapshots = 0

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
    ) -> SWAGPosterior:
        """An empty posterior for ``model``'s trainable parameters (or those matching ``include``).

        ``device`` defaults to the device of the model's first tracked parameter.
        """
        selected = select_parameters(model, include)
        if device is None:
            device = selected[0][1].device
        return cls(
            {n: p.shape for n, p in selected},
            max_rank,
            moment_dtype=moment_dtype,
            deviation_dtype=deviation_dtype,
            device=device,
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
    def mean(self) -> Tensor:
        """The SWA weights ``θ̄`` as a flat ``[P]`` tensor (a copy)."""
        self._require_snapshots("mean")
        return self._mean.clone()

    @property
    def second_moment(self) -> Tensor:
        """``E[θ²]`` as a flat ``[P]`` tensor (a copy)."""
        self._require_snapshots("second_moment")
        return self._sq_mean.clone()

    @property
    def variance(self) -> Tensor:
        """Diagonal variance ``E[θ²] − E[θ]²``, clamped at 0 against round-off."""
        self._require_snapshots("variance")
        return (self._sq_mean - self._mean.square()).clamp_(min=0)

    @property
    def deviations(self) -> Tensor:
        """The ``[k, P]`` deviation rows ``θ_i − θ̄_i``, oldest first (a copy)."""
        k = self.rank
        if self._num_snapshots <= self.max_rank or self.max_rank == 0:
            return self._deviations[:k].clone()
        start = self._num_snapshots % self.max_rank
        return torch.cat([self._deviations[start:], self._deviations[:start]])

    def __repr__(self) -> str:
        return (
            f"SWAGPosterior(num_params={self.num_params}, num_snapshots={self.num_snapshots}, "
            f"rank={self.rank}/{self.max_rank}, device={self.device}, moment_dtype={self.moment_dtype}, "
            f"deviation_dtype={self.deviation_dtype})"
        )

    # ------------------------------------------------------------------ collection
    def collect(self, model: nn.Module | Mapping[str, Tensor]) -> None:
        """Add a snapshot of the tracked parameters of ``model`` (a module, or a name→tensor map).

        Raises:
            KeyError / ValueError: when a tracked parameter is missing or has another shape.
            FloatingPointError: when a weight is NaN or infinite (the snapshot is not added).
        """
        named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
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
        with torch.no_grad():
            torch._foreach_copy_(self._scratch_views, tensors)
            self._add_flat_scratch()

    def collect_flat(self, theta: Tensor) -> None:
        """Add a snapshot given as a flat ``[P]`` vector (tracked parameters concatenated)."""
        if theta.dim() != 1 or theta.numel() != self.num_params:
            raise ValueError(
                f"Expected a flat vector of {self.num_params} weights, got shape {tuple(theta.shape)}."
            )
        with torch.no_grad():
            self._scratch.copy_(theta)
            self._add_flat_scratch()

    def _add_flat_scratch(self) -> None:
        theta = self._scratch
        if not bool(torch.isfinite(theta).all()):
            bad = [
                name
                for name, view in zip(self.param_shapes, self._scratch_views, strict=True)
                if not bool(torch.isfinite(view).all())
            ]
            raise FloatingPointError(
                f"Snapshot {self._num_snapshots + 1} has NaN or infinite weights in {', '.join(bad)}; "
                "it was not added to the posterior. Lower the learning rate or clip gradients."
            )
        n = self._num_snapshots
        weight = 1.0 / (n + 1)
        self._mean.lerp_(theta, weight)
        self._sq_mean.mul_(1.0 - weight).addcmul_(theta, theta, value=weight)
        if self.max_rank > 0:
            # deviation from the running mean right after adding θ (as in the paper).
            theta.sub_(self._mean)
            self._deviations[n % self.max_rank].copy_(theta)
        self._num_snapshots = n + 1

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        num_samples: int,
        scale: float = 0.5,
        generator: torch.Generator | None = None,
        *,
        diagonal_only: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw flat weight vectors ``[num_samples, P]`` from the SWAG Gaussian.

        Args:
            num_samples: how many weight vectors.
            scale: covariance scale; ``0.5`` is the paper's ``1/√2`` on the standard deviation.
                ``0`` returns the SWA mean.
            generator: random source (on the posterior's device); the global RNG is used when
                ``None``, and is never reseeded.
            diagonal_only: ignore the low-rank term (SWAG-Diagonal).
            dtype: dtype of the result (default: the moment dtype).
            device: where to put the result (default: the posterior's device).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
        if not scale >= 0 or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}.")
        self._require_snapshots("sample")
        out_dtype = dtype or self.moment_dtype
        mean = self._mean
        if scale == 0:
            samples = mean.expand(num_samples, -1).clone()
        else:
            # Memory: only the [S, P] result. z₁ is drawn straight into it, √var is computed in the
            # scratch vector (overwritten by the next collect), and the low-rank term is added
            # in column blocks, so neither a float64 copy of the [K, P] deviations nor an [S, P]
            # temporary is made.
            samples = torch.randn(
                num_samples, self.num_params, generator=generator, device=self.device, dtype=mean.dtype
            )
            std = self._scratch
            torch.mul(mean, mean, out=std)
            torch.sub(self._sq_mean, std, out=std).clamp_(min=0).sqrt_()
            samples.mul_(std)
            k = self.rank
            if k >= 2 and not diagonal_only:
                z2 = torch.randn(num_samples, k, generator=generator, device=self.device, dtype=mean.dtype)
                # Rows of the ring buffer in any order give the same D̂ᵀD̂; no reordering needed.
                deviations = self._deviations[:k]
                alpha = 1.0 / math.sqrt(k - 1)
                for start in range(0, self.num_params, _SAMPLE_BLOCK):
                    cols = slice(start, start + _SAMPLE_BLOCK)
                    samples[:, cols].addmm_(z2, deviations[:, cols].to(mean.dtype), alpha=alpha)
            samples.mul_(math.sqrt(scale)).add_(mean)
        return samples.to(dtype=out_dtype, device=device or self.device)

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

    def flatten(self, model: nn.Module) -> Tensor:
        """The tracked parameters of ``model`` as one flat vector (a copy)."""
        self.check_compatible(model)
        named = dict(model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.param_shapes])

    def load_into(self, model: nn.Module, flat: Tensor | None = None) -> nn.Module:
        """Write ``flat`` (default: the SWA mean) into the tracked parameters of ``model``, in place."""
        self.check_compatible(model)
        if flat is None:
            flat = self.mean
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                named[name].copy_(value)
        return model

    def check_compatible(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` that names the mismatch when ``model`` does not fit this posterior."""
        named = dict(model.named_parameters())
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
        """Everything needed to rebuild this posterior; tensors are stored as they live."""
        return {
            "format_version": _FORMAT_VERSION,
            "param_shapes": {n: list(s) for n, s in self.param_shapes.items()},
            "max_rank": self.max_rank,
            "num_snapshots": self._num_snapshots,
            "mean": self._mean,
            "sq_mean": self._sq_mean,
            "deviations": self._deviations,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict` into this (same-shaped) posterior."""
        shapes = {n: torch.Size(s) for n, s in state["param_shapes"].items()}
        if shapes != self.param_shapes or int(state["max_rank"]) != self.max_rank:
            raise ValueError(
                "Saved SWAG state does not match this posterior "
                f"(saved {len(shapes)} tensors, max_rank={state['max_rank']}; "
                f"here {len(self.param_shapes)} tensors, max_rank={self.max_rank}). "
                "Build the posterior with SWAGPosterior.from_state_dict instead."
            )
        self._mean.copy_(state["mean"])
        self._sq_mean.copy_(state["sq_mean"])
        self._deviations.copy_(state["deviations"])
        self._num_snapshots = int(state["num_snapshots"])

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], device: torch.device | str | None = None
    ) -> SWAGPosterior:
        """Build a posterior from :meth:`state_dict` output (dtypes preserved)."""
        version = state.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"Unsupported SWAG state format {version!r} (this version reads {_FORMAT_VERSION})."
            )
        post = cls(
            state["param_shapes"],
            int(state["max_rank"]),
            moment_dtype=state["mean"].dtype,
            deviation_dtype=state["deviations"].dtype,
            device=device if device is not None else state["mean"].device,
        )
        post.load_state_dict(state)
        return post

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the posterior to ``path`` with ``torch.save`` (tensors moved to CPU)."""
        state = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.state_dict().items()}
        torch.save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str | None = "cpu") -> SWAGPosterior:
        """Read a posterior written by :meth:`save`."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_state_dict(state, device=device)

    def to(self, device: torch.device | str) -> SWAGPosterior:
        """Move the statistics to ``device`` (in place) and return ``self``."""
        device = torch.device(device)
        self._mean = self._mean.to(device)
        self._sq_mean = self._sq_mean.to(device)
        self._deviations = self._deviations.to(device)
        self._scratch = torch.empty_like(self._mean)
        self._scratch_views = list(self._split(self._scratch))
        return self

    # ------------------------------------------------------------------ helpers
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
