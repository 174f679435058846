"""Recompute BatchNorm running statistics for SWA / SWAG weights, without touching the model.

The running mean and variance a BatchNorm layer stores belong to the weights it was trained
with. SWA weights (the posterior mean) and SWAG samples are *other* weights, so their activations
have other statistics, and using the stale buffers of the last SGD iterate degrades predictions
(Izmailov et al., 2018; Maddox et al., 2019). :func:`refresh_batchnorm` recomputes them with one
pass over (part of) the training data, following :func:`torch.optim.swa_utils.update_bn`: the
statistics are reset and accumulated as an equal-weight average over batches (``momentum=None``
semantics), in train mode.

Unlike ``update_bn`` it is **functional**: the forward passes run through
:func:`torch.func.functional_call` with the given weights and with fresh buffers, so the model is
neither copied nor modified; the recomputed buffers are returned as ``{buffer_name: tensor}``, ready
to be passed to ``functional_call`` together with the weights for prediction::

    buffers = refresh_batchnorm(model, sampled_params, train_loader, num_batches=50)
    logits = functional_call(model, {**sampled_params, **buffers}, (x,))  # model in eval mode

:func:`refresh_batchnorm_batched` does the same for a chunk of weight samples ``{name: [S, ...]}``
(the layout :meth:`SWAGModule.iter_weight_samples` yields) in a single pass over the data,
vectorised with :func:`torch.func.vmap` (a per-sample loop when the model cannot be traced).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_swag.checks import check_batch_count
from lightning_swag.predictive.batches import call_model, default_batch_inputs, to_device
from lightning_swag.predictive.subset import SplitUnavailable, find_split
from lightning_swag.predictive.vectorize import SampleMap, Vectorize, choose_vectorization

__all__ = [
    "BatchNormRefresh",
    "batches_to_use",
    "batchnorm_buffer_names",
    "has_batchnorm",
    "refresh_batchnorm",
    "refresh_batchnorm_batched",
]

BatchInputs = Callable[[Any], Any]


_log = logging.getLogger(__name__)


def _batchnorm_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(prefix, module)`` of every BatchNorm layer that keeps running statistics."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None
    ]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics (which SWA/SWAG weights need refreshed)."""
    return bool(_batchnorm_modules(model))


def batchnorm_downstream(model: nn.Module, tracked: Iterable[str], inputs: Any) -> list[str]:
    """The BatchNorm layers of ``model`` that run at or after the first module owning a ``tracked``
    parameter (names inside ``model``) in one forward pass on ``inputs`` (the model as it is, without
    gradients): their inputs may depend on the sampled weights, so the running statistics of the
    trained model do not match the samples."""
    owners = {name.rpartition(".")[0] for name in tracked}
    started: list[bool] = []
    downstream: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name in owners:
            handles.append(module.register_forward_pre_hook(lambda *_: started.append(True)))
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            handles.append(
                module.register_forward_pre_hook(
                    lambda *_, name=name: (
                        downstream.append(name) if started and name not in downstream else None
                    )
                )
            )
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return downstream


def batchnorm_buffer_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_buffers()``) of the BatchNorm buffers :func:`refresh_batchnorm` returns."""
    names = []
    for prefix, module in _batchnorm_modules(model):
        p = f"{prefix}." if prefix else ""
        names += [p + "running_mean", p + "running_var"]
        if module.num_batches_tracked is not None:
            names.append(p + "num_batches_tracked")
    return names


def batches_to_use(loader: Iterable, num_batches: int | float | None) -> int | None:
    """How many batches to use: all (``None``), a count (``int >= 1``) or a fraction of ``len(loader)``."""
    check_batch_count("num_batches", num_batches)
    if num_batches is None or isinstance(num_batches, int):
        return num_batches
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError("A fractional num_batches needs a loader with a length; pass an int.") from err
    return max(1, math.ceil(num_batches * total))


def _resolve_device(
    model: nn.Module, parameters: Mapping[str, Tensor], device: torch.device | str | None
) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in itertools.chain(parameters.values(), model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _fresh_buffers(
    modules: list[tuple[str, _BatchNorm]], lead: tuple[int, ...], device: torch.device
) -> dict[str, Tensor]:
    """Reset statistics (as ``reset_running_stats``), with an optional leading sample dimension."""
    fresh: dict[str, Tensor] = {}
    for prefix, module in modules:
        p = f"{prefix}." if prefix else ""
        mean, var = module.running_mean, module.running_var
        assert mean is not None and var is not None
        fresh[p + "running_mean"] = torch.zeros(*lead, *mean.shape, dtype=mean.dtype, device=device)
        fresh[p + "running_var"] = torch.ones(*lead, *var.shape, dtype=var.dtype, device=device)
        if module.num_batches_tracked is not None:
            fresh[p + "num_batches_tracked"] = torch.zeros(lead, dtype=torch.long, device=device)
    return fresh


def _run_passes(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | float | None,
    device: torch.device,
    batch_inputs: BatchInputs | None,
    pass_batch: Callable[[Any], None],
) -> None:
    """One pass over the loader in train mode with cumulative-average momentum; the model's modes and
    momenta are restored afterwards, whatever happens."""
    modules = _batchnorm_modules(model)
    limit = batches_to_use(loader, num_batches)
    extract = batch_inputs or default_batch_inputs
    modes = [(module, module.training) for module in model.modules()]
    momenta = [(module, module.momentum) for _, module in modules]
    seen = 0
    try:
        model.train()
        batches = itertools.islice(loader, limit) if limit is not None else loader
        with torch.no_grad():
            for seen, batch in enumerate(batches, start=1):  # noqa: B007 - `seen` is used after the loop
                inputs = to_device(extract(batch), device)
                # momentum = 1/n at the n-th batch is the equal-weight running average that
                # ``momentum=None`` gives, without reading num_batches_tracked (which vmap cannot).
                for module, _ in momenta:
                    module.momentum = 1.0 / seen
                pass_batch(inputs)
    finally:
        for module, momentum in momenta:
            module.momentum = momentum
        for each, training in modes:
            each.training = training
    if seen == 0:
        raise ValueError("refresh_batchnorm: the loader yielded no batch, so no statistics were computed.")


@torch.no_grad()
def refresh_batchnorm(
    model: nn.Module,
    parameters: Mapping[str, Tensor] | None,
    loader: Iterable,
    num_batches: int | float | None = None,
    device: torch.device | str | None = None,
    *,
    batch_inputs: BatchInputs | None = None,
) -> dict[str, Tensor]:
    """BatchNorm running statistics recomputed for the weights ``parameters``, without changing ``model``.

    Same semantics as :func:`torch.optim.swa_utils.update_bn`: the statistics are reset, then
    averaged with equal weight over the batches of ``loader`` (``momentum=None``), with the model in
    train mode. The forward passes use ``torch.func.functional_call``, so ``model``'s parameters,
    buffers, BatchNorm momenta and train/eval modes are left exactly as they were.

    Args:
        model: the network (not copied, not modified).
        parameters: ``{name: tensor}`` weights to use (e.g. a SWAG sample from
            ``posterior.unflatten(flat)``); names not given are taken from ``model``. ``None`` uses
            the model's own weights.
        loader: an iterable of batches (usually the training ``DataLoader``).
        num_batches: use only the first ``num_batches`` batches (``int``) or this fraction of
            ``len(loader)`` (``float`` in (0, 1]); ``None`` is one full pass.
        device: where inputs and the returned buffers go (default: the device of ``parameters``,
            else of the model).
        batch_inputs: extracts the model input from a batch (default:
            :func:`lightning_swag.predictive.batches.default_batch_inputs`; ``SWAGModule`` passes its
            ``batch_inputs``).

    Returns:
        ``{buffer_name: tensor}`` for every BatchNorm ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` (empty when the model has no BatchNorm with running stats; the
        loader is then not iterated). Pass it to ``functional_call`` along with the weights.
    """
    parameters = dict(parameters) if parameters is not None else {}
    modules = _batchnorm_modules(model)
    if not modules:
        return {}
    device = _resolve_device(model, parameters, device)
    fresh = _fresh_buffers(modules, (), device)
    # Other buffers are cloned so that no in-place update in forward can reach the model's own.
    others = {n: b.clone() for n, b in model.named_buffers() if n not in fresh}
    state = {**others, **parameters, **fresh}

    def pass_batch(inputs: Any) -> None:
        call_model(lambda *args, **kwargs: functional_call(model, state, args, kwargs), inputs)

    _run_passes(model, loader, num_batches, device, batch_inputs, pass_batch)
    return fresh


@torch.no_grad()
def refresh_batchnorm_batched(
    model: nn.Module,
    parameters: Mapping[str, Tensor],
    loader: Iterable,
    num_batches: int | float | None = None,
    device: torch.device | str | None = None,
    *,
    batch_inputs: BatchInputs | None = None,
    vectorize: Vectorize | bool = "auto",
) -> dict[str, Tensor]:
    """:func:`refresh_batchnorm` for a chunk of ``S`` weight samples ``{name: [S, *shape]}``, in one
    pass over the data.

    Each batch goes through all ``S`` models, with ``torch.func.vmap`` or one ``functional_call``
    per sample as ``vectorize`` says (see :mod:`lightning_swag.predictive.vectorize`; ``"auto"``: a loop on the
    CPU, ``vmap`` elsewhere). The result for sample ``i`` equals
    ``refresh_batchnorm(model, {k: v[i] ...}, loader, ...)``.

    Returns:
        ``{buffer_name: [S, *shape]}``; slice ``i`` goes with sample ``i``.
    """
    parameters = dict(parameters)
    if not parameters:
        raise ValueError("refresh_batchnorm_batched needs at least one [S, ...] parameter tensor.")
    sizes = {v.shape[0] if v.dim() else None for v in parameters.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"All parameter tensors must share a leading sample dimension; got sizes {sizes}.")
    num = sizes.pop()
    assert num is not None
    modules = _batchnorm_modules(model)
    if not modules:
        return {}
    device = _resolve_device(model, parameters, device)
    fresh = _fresh_buffers(modules, (num,), device)
    others = {n: b.clone() for n, b in model.named_buffers() if n not in fresh}
    mapper = SampleMap(choose_vectorization(vectorize, device), "refresh_batchnorm_batched")

    def run_one(params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Any) -> Any:
        state = {**others, **params, **buffers}
        return call_model(lambda *args, **kwargs: functional_call(model, state, args, kwargs), inputs)

    def pass_batch(inputs: Any) -> None:
        mapper(run_one, parameters, fresh, inputs, restore=fresh, model_name=type(model).__name__)

    _run_passes(model, loader, num_batches, device, batch_inputs, pass_batch)
    return fresh


class BatchNormRefresh:
    """BatchNorm statistics recomputed for every chunk of weight samples of a run, kept for the run.

    ``SWAGModule(bn_loader=...)`` uses one: each chunk of samples gets its buffers from one pass over
    (part of) the training data, as :func:`refresh_batchnorm_batched`. With a split model (a subset
    posterior, see :mod:`lightning_swag.predictive.subset`) only the submodule runs under the samples: the rest
    computes its inputs once per batch, in train mode as ``update_bn`` runs the whole model.

    Args:
        loader: the training batches.
        num_batches: a count or fraction of ``loader`` to use (``None``: all).
        batch_inputs: extracts the model input from a batch.
        progress: wraps an iterable of batches in a progress bar (or returns it).
    """

    def __init__(
        self,
        loader: Iterable,
        num_batches: int | float | None,
        batch_inputs: BatchInputs,
        progress: Callable[[Iterable, int | None, str], Iterable] | None = None,
    ) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.batch_inputs = batch_inputs
        self.progress = progress
        self._cache: dict[Any, dict[str, Tensor]] = {}

    def buffers(
        self, model: nn.Module, chunk: Mapping[str, Tensor], key: Any, vectorize: Vectorize, split: Any = None
    ) -> dict[str, Tensor]:
        """The refreshed buffers ``{model name: [n, ...]}`` of ``chunk`` (cached under ``key``)."""
        if key in self._cache:
            return self._cache[key]
        total = len(self.loader) if isinstance(self.loader, Sized) else None
        limit = batches_to_use(self.loader, self.num_batches)
        if limit is not None:
            total = limit if total is None else min(total, limit)
        batches: Iterable = self.loader
        if self.progress is not None:
            batches = self.progress(batches, total, "SWAG: BatchNorm refresh")
        result = None
        if split is not None:
            try:
                captured = _captured_inputs(model, split, batches, self.batch_inputs, limit)
                inner = refresh_batchnorm_batched(
                    split.submodule,
                    split.relative(chunk),
                    captured,
                    None,
                    batch_inputs=_same,
                    vectorize=vectorize,
                )
                result = {f"{split.prefix}.{name}": value for name, value in inner.items()}
            except SplitUnavailable:  # a training batch cannot take the split: refresh the whole model
                result = None
        if result is None:
            result = refresh_batchnorm_batched(
                model, chunk, batches, self.num_batches, batch_inputs=self.batch_inputs, vectorize=vectorize
            )
        self._cache[key] = result
        return result

    def clear(self) -> None:
        self._cache = {}


def _same(batch: Any) -> Any:
    return batch


def _captured_inputs(
    model: nn.Module, split: Any, batches: Iterable, batch_inputs: BatchInputs, limit: int | None
):
    """The split submodule's call arguments for each batch, computed with the model in train mode
    (on copies of its buffers, which a train-mode BatchNorm updates); :class:`SplitUnavailable` when
    a batch fails the split's checks."""
    device = next(iter(model.parameters())).device
    modes = [(module, module.training) for module in model.modules()]
    chosen = itertools.islice(batches, limit) if limit is not None else batches
    weights = {name: p.detach() for name, p in model.named_parameters()}
    try:
        for batch in chosen:
            model.train()
            state = {**weights, **{name: b.clone() for name, b in model.named_buffers()}}
            yield split.capture(to_device(batch_inputs(batch), device), state)
    finally:
        for module, training in modes:
            module.training = training


class BatchNormPolicy:
    """How averaging treats a model's BatchNorm layers.

    With a training loader their statistics are recomputed for every weight sample
    (:class:`BatchNormRefresh`), and a BatchNorm layer outside the sampled submodule makes the whole
    model run under every sample. Without one, a warning says that the trained statistics meet
    sampled weights: at construction when that is clear, else at the first batch, from the order in
    which the layers run (a layer that runs before every tracked parameter never sees a sample).

    Args:
        model: the network.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.present = has_batchnorm(model)
        self._order_unknown = False

    def allows_split(self, tracked: Sequence[str], refreshing: bool) -> bool:
        """Whether the subset split may be taken: not when refreshed BatchNorm layers lie outside the
        submodule it would sample (their statistics depend on every sample too)."""
        if not refreshing or not self.present:
            return True
        candidate = find_split(self.model, tracked)
        if candidate is None:
            return True
        inside = {id(m) for m in candidate.submodule.modules()}
        outside = any(
            has_batchnorm(m) and id(m) not in inside for m in self.model.modules() if not list(m.children())
        )
        if outside:
            _log.info(
                "SWAGModule: the rest of the network is run for every sample too, because it has BatchNorm "
                "layers that bn_loader refreshes."
            )
        return not outside

    def refresh(
        self,
        loader: Iterable | None,
        num_batches: int | float | None,
        batch_inputs: BatchInputs,
        progress: Callable[[Iterable, int | None, str], Iterable] | None,
        in_place: bool,
    ) -> BatchNormRefresh | None:
        """The refresh of ``loader``'s statistics (``None`` without a loader or BatchNorm layers)."""
        if loader is None or not self.present:
            return None
        if in_place:
            raise ValueError(
                "SWAGModule: the BatchNorm refresh (bn_loader) is not supported with FSDP2-sharded models "
                "yet; leave bn_loader unset, or predict with the unsharded model."
            )
        return BatchNormRefresh(loader, num_batches, batch_inputs, progress)

    def warn_if_stale(self, tracked: Sequence[str] | None, split_forward: bool) -> None:
        """At construction without a loader: warn, unless a split could prove the trained statistics
        never meet a sample (then the first batch decides, :meth:`check_order`)."""
        if not self.present:
            return
        if tracked is not None and split_forward:
            candidate = find_split(self.model, tracked)
            if candidate is not None and not has_batchnorm(candidate.submodule):
                self._order_unknown = True
                return
        _warn_stale(type(self.model).__name__, [])

    @property
    def order_unknown(self) -> bool:
        """Whether the first batch must still tell (see :meth:`check_order`)."""
        return self._order_unknown

    def check_order(self, tracked: Sequence[str], inputs: Any, split_kept: bool) -> None:
        """At the first batch, when construction could not tell: warn when a BatchNorm layer runs after
        a tracked parameter. A kept split proves there is none (the model's output is the sampled
        submodule's)."""
        if not self._order_unknown:
            return
        self._order_unknown = False
        if split_kept:
            return
        late = batchnorm_downstream(self.model, tracked, inputs)
        if late:
            _warn_stale(type(self.model).__name__, late)


def _warn_stale(model_name: str, layers: list[str]) -> None:
    where = f" ({', '.join(repr(n) for n in layers)} after the sampled weights)" if layers else ""
    warnings.warn(
        f"SWAGModule: {model_name} has BatchNorm layers{where} but no bn_loader was given, so every weight "
        "sample is run with the running statistics of the trained model, which do not match the sampled "
        "weights. Pass bn_loader=<training loader or DataModule> to recompute them.",
        stacklevel=6,
    )
