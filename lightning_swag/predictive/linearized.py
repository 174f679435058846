"""The linearised predictive: outputs linear in the tracked weights around the SWA mean.

With ``f(θ) ≈ f(θ̄) + J (θ − θ̄)`` and the SWAG Gaussian ``θ ~ N(θ̄, scale · (diag(var) + D̂ᵀD̂ / (k − 1)))``,
the outputs are Gaussian: ``N(f(θ̄), scale · (J diag(var) Jᵀ + (J D̂ᵀ)(J D̂ᵀ)ᵀ / (k − 1)))``. The
low-rank term ``F = D̂ / √(k − 1)`` comes from the posterior's ``covariance_factors()`` (any
:class:`~lightning_swag.posterior.protocol.GaussianPosterior`: SWAG-Diagonal, ``covariance="diagonal"``,
has none, nor has SWAG with ``k < 2``, as in sampling; other posteriors are refused). ``f`` is the
module the batch runs under the weights (the split submodule, or the whole model when the batch
takes no split, see :class:`~lightning_swag.predictive.runner.PreparedInputs`), with the BatchNorm statistics
of the SWA mean when ``bn_loader`` is given (fixed while differentiating).

What is exact and what is approximated:

* **The linearisation** is exact when the module is linear in its weights: one ``nn.Linear``, or a
  convolution with all-ones kernels, stride 1, no padding and one group (a 1×1 segmentation head,
  linear per position with the channels as features). There the Gaussian above costs about one
  forward pass (diagonal term ``Σ_j var[c, j] φ_j² + var_b[c]``, low-rank columns ``φ·D_j + b_j``).
  Any other module is linearised at ``θ̄``, an approximation that is good for small ``scale``.
  Its Jacobian is exact: per example, in reverse mode (``jacrev``, one backward pass per output
  element), vectorised over the examples (a loop where ``vmap`` cannot trace the module), in chunks
  of at most :data:`JACOBIAN_BYTES`; both covariance terms come from it. The examples of a batch
  must be independent (eval mode); an argument is cut into examples when its first dimension is
  the batch size (that of the output), any other is passed whole to every example. When that would
  cost far more than the sampled predictive, or the module cannot be differentiated, an error says
  so and names ``predictive="sampled"``.
* **The link** (softmax, sigmoid): ``link_approx="probit"`` uses only the diagonal of the output
  covariance, in closed form: the probit approximation for classification, the Gaussian itself
  (mean and standard deviation, plus the noise model) for regression.
  ``link_approx="mc"`` averages the linearised outputs ``f(θ̄) + J(θ_s − θ̄)`` over the weight
  samples ``θ_s`` of the sampled predictive (same run seed, same samples whatever the batches or
  processes), so it keeps the whole covariance and converges to the exact average of the
  linearised model; on a module linear in its weights it *is* the sampled predictive.

MultiSWAG gives a mixture of one Gaussian per posterior. Sharded posteriors are refused: gather
them first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from lightning_swag.likelihoods import Likelihood
from lightning_swag.posterior.protocol import GaussianPosterior, gaussian_of, layout_of, unflatten
from lightning_swag.predictive.base import Predictive, PredictiveContext, RunState
from lightning_swag.predictive.batches import CallArguments, call_model, without_inference_tensors
from lightning_swag.predictive.batchnorm import BatchNormRefresh
from lightning_swag.predictive.runner import ExecutionPlan, ModelRunner, PreparedInputs
from lightning_swag.predictive.weights import SamplingSpec, WeightStream

__all__ = ["COLUMN_BYTES", "COST_RATIO_LIMIT", "JACOBIAN_BYTES", "LinearizedPredictive"]

COST_RATIO_LIMIT = 10
"""The linearised predictive is refused when its estimated cost exceeds this many times that of the
sampled predictive with the same ``num_samples`` (at least 30)."""
COLUMN_BYTES = 16 * 2**20
"""Upper bound on the bytes of the low-rank columns of a linear layer held at once."""
JACOBIAN_BYTES = 256 * 2**20
"""Upper bound on the bytes of the per-example Jacobians held at once (the batch is cut in chunks)."""

Named = dict[str, Tensor]
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LinearizedPredictive(Predictive):
    """The Gaussian predictive of the linearised outputs (see the module docstring).

    Args:
        likelihood: what the outputs mean.
        stream: gives the posteriors, the model's names and dtypes, and the weight samples of ``"mc"``.
        runner: runs the model (the split submodule alone when the rest runs once per batch).
        batchnorm: recomputes the BatchNorm statistics of the SWA mean (``None``: the model's own).
        link_approx: ``"probit"`` or ``"mc"`` (how a nonlinear link is averaged).
    """

    name = "linearized"

    def __init__(
        self,
        likelihood: Likelihood,
        stream: WeightStream,
        runner: ModelRunner,
        batchnorm: BatchNormRefresh | None = None,
        link_approx: str = "probit",
    ) -> None:
        super().__init__(likelihood)
        first = list(stream.posteriors[0].param_shapes)
        for i, post in enumerate(stream.posteriors):
            gaussian_of(post, f"posterior {i}")
            layout = layout_of(post)
            if layout.is_sharded:
                raise ValueError(
                    f"predictive='linearized' needs whole posteriors, but posterior {i} keeps a "
                    f"{layout.describe()}: gather() it to one process, or use predictive='sampled'."
                )
            if list(post.param_shapes) != first:
                raise ValueError(
                    f"predictive='linearized' needs posteriors over the same parameters, but posterior {i} "
                    "tracks other ones than posterior 0."
                )
        self.stream = stream
        self.runner = runner
        self.batchnorm = batchnorm
        self.link_approx = link_approx
        self.uses_weight_samples = link_approx == "mc"
        self._moments: dict[int, tuple[Named, Named, Named]] = {}
        self._checked = False

    @classmethod
    def from_context(cls, context: PredictiveContext) -> LinearizedPredictive:
        stream = context.stream()
        return cls(context.likelihood, stream, context.runner(stream), context.batchnorm, context.link_approx)

    @property
    def plan(self) -> ExecutionPlan:
        return self.runner.plan

    def reset(self) -> None:
        self._moments = {}
        self.stream.clear()
        if self.batchnorm is not None:
            self.batchnorm.clear()

    def predict(self, inputs: Any, run: RunState, keep_samples: bool) -> dict[str, Tensor]:
        if self.uses_weight_samples:
            draws = self.outputs(inputs, run)
            if not keep_samples:
                return self.likelihood.summarize(draws)
            stacked = torch.cat(list(draws), dim=0)
            return {**self.likelihood.summarize([stacked]), **self.likelihood.sample_entries(stacked)}
        means, variances = self.gaussians(inputs, run)
        summary = self.likelihood.summarize_gaussian(means, variances)
        if keep_samples:
            summary.setdefault("samples", means)  # one "sample" per posterior: its linearised mean
        return summary

    def components(self, inputs: Any, run: RunState) -> tuple[Tensor, Tensor | None]:
        """The linearised Gaussians (``"probit"``), or the linearised outputs of the weight samples
        (``"mc"``)."""
        if self.uses_weight_samples:
            return super().components(inputs, run)
        return self.gaussians(inputs, run)

    def gaussians(self, inputs: Any, run: RunState) -> tuple[Tensor, Tensor]:
        """Means and per-element variances ``[J, B, ...]`` of the linearised outputs, one Gaussian
        per posterior (the diagonal of its covariance)."""
        prepared = self._prepare(inputs)
        moments = [self._gaussian(i, post, prepared, run.spec) for i, post in enumerate(self._gaussians())]
        means = torch.stack([mean for mean, _ in moments])
        self._check(means)
        return means, torch.stack([variance for _, variance in moments])

    def outputs(self, inputs: Any, run: RunState) -> Iterator[Tensor]:
        """The linearised outputs ``f(θ̄) + J(θ_s − θ̄)`` ``[n, B, ...]`` under the run's weight samples
        ``θ_s`` (those of the sampled predictive), chunk by chunk in sample order."""
        prepared = self._prepare(inputs)
        if self._linear_axis(prepared) is not None:
            chunks = self.stream.chunks(
                run.spec, run.seed, self.runner.prepare_chunk, key=self.runner.prepare_key
            )
            for chunk in chunks:  # linear in the weights: the linearisation is the module itself
                outputs = self.runner.run(chunk, prepared, {})
                self._check(outputs)
                yield outputs
            return
        yield self._jacobian_draws(prepared, run)

    # ------------------------------------------------------------------ one posterior's Gaussian
    def _gaussians(self) -> list[GaussianPosterior]:
        """The stream's posteriors, each checked to be a ``GaussianPosterior`` in ``__init__``."""
        return [cast(GaussianPosterior, post) for post in self.stream.posteriors]

    def _prepare(self, inputs: Any) -> PreparedInputs:
        self.runner.decide(inputs, self.stream.mean_weights)
        return self.runner.prepare_inputs(inputs)

    def _check(self, outputs: Tensor) -> None:
        if not self._checked:
            self.likelihood.check_outputs(outputs)
            self._checked = True

    def _gaussian(
        self, index: int, post: GaussianPosterior, prepared: PreparedInputs, spec: SamplingSpec
    ) -> tuple[Tensor, Tensor]:
        """Mean ``f(θ̄)`` and the per-element variance of the linearised outputs of posterior ``index``."""
        module, split = self._module(prepared)
        mean, variance, factor = (self._relative(t, split) for t in self._posterior_moments(index, post))
        rows = factor or None
        axis = self._linear_axis(prepared)
        if axis is not None:
            out, diag, low = _linear_moments(module, axis, prepared.inputs, mean, variance, rows)
        else:
            linearization = self._linearization(index, post, prepared)
            out = linearization.out
            _check_cost(out, spec.num_samples)
            diag = torch.zeros(out.shape, dtype=_work_dtype(out), device=out.device)
            low = None if rows is None else torch.zeros_like(diag)
            flat_var = _flatten(variance, diag.dtype)
            flat_rows = None if rows is None else _flatten(rows, diag.dtype, leading=1)
            for where, jac in linearization.jacobians():  # [b, O, P]
                diag[where] = (jac.square() @ flat_var).reshape(-1, *out.shape[1:])
                if low is not None and flat_rows is not None:
                    low[where] = (jac @ flat_rows.T).square().sum(dim=-1).reshape(-1, *out.shape[1:])
        total = diag if low is None else diag + low
        return out.to(total.dtype), total * spec.scale

    def _jacobian_draws(self, prepared: PreparedInputs, run: RunState) -> Tensor:
        """``f(θ̄_j) + J_j (θ_s − θ̄_j)`` ``[J·S, B, ...]`` for the ``S`` samples of every posterior ``j``
        (for every chunk of examples the samples are read again: from the stream's cache when they
        fit it, else drawn again from the same seed)."""
        _, split = self._module(prepared)
        per_post = run.spec.num_samples
        parts = []
        for index, post in enumerate(self._gaussians()):
            linearization = self._linearization(index, post, prepared)
            out = linearization.out
            _check_cost(out, per_post)
            draws = out.to(_work_dtype(out)).expand(per_post, *out.shape).clone()
            mean = _flatten(self._relative(self._posterior_moments(index, post)[0], split), draws.dtype)
            for where, jac in linearization.jacobians():  # [b, O, P]
                start = 0
                for chunk in self._posterior_chunks(index, run):
                    delta = _flatten(self._relative(chunk, split), draws.dtype, leading=1) - mean  # [n, P]
                    stop = start + delta.shape[0]
                    moved = (jac @ delta.T).movedim(-1, 0)  # [n, b, O]
                    draws[start:stop, where] += moved.reshape(stop - start, -1, *out.shape[1:])
                    start = stop
            parts.append(draws)
        draws = torch.cat(parts)
        self._check(draws)
        return draws

    def _posterior_chunks(self, index: int, run: RunState) -> Iterator[Named]:
        """The chunks of samples of posterior ``index`` (the stream gives every posterior's in turn)."""
        start, seen = index * run.spec.num_samples, 0
        for chunk in self.stream.chunks(
            run.spec, run.seed, self.runner.prepare_chunk, key=self.runner.prepare_key
        ):
            n = next(iter(chunk.values())).shape[0]
            if start <= seen < start + run.spec.num_samples:
                yield chunk
            seen += n

    def _linear_axis(self, prepared: PreparedInputs) -> int | None:
        """The feature axis of the batch's module when it is linear in the tracked weights (see
        :func:`_linear_axis`)."""
        module, split = self._module(prepared)
        names = {self.stream.model_name(n): n for n in self.stream.posteriors[0].param_shapes}
        tracked = self._relative(names, split)  # type: ignore[arg-type]
        return _linear_axis(module, tracked, split is not None or self.runner.output_transform is None)

    def _module(self, prepared: PreparedInputs) -> tuple[nn.Module, Any]:
        """The module this batch runs under the tracked weights, and its split (``None``: the model)."""
        split = prepared.split
        return (self.runner.model if split is None else split.submodule), split

    @staticmethod
    def _relative(tensors: Named, split: Any) -> Named:
        """``tensors`` (model names) as the module of the batch names them."""
        return dict(tensors) if split is None else split.relative(tensors)

    def _posterior_moments(self, index: int, post: GaussianPosterior) -> tuple[Named, Named, Named]:
        """Mean, variance and low-rank factor rows ``F`` (covariance ``diag(variance) + FᵀF``, see
        :class:`~lightning_swag.posterior.protocol.GaussianPosterior`; ``{}`` without a low-rank term)
        of ``post`` by model name, each in its parameter's dtype on the model's device (cached for the
        run; normal tensors even under ``inference_mode``)."""
        if index not in self._moments:
            stream = self.stream

            def named(flat: Tensor) -> Named:  # copies: never the posterior's own tensors
                parts = unflatten(post.param_shapes, flat)
                return {
                    stream.model_name(n): v.to(device=stream.device, dtype=stream.model_dtype(n), copy=True)
                    for n, v in parts.items()
                }

            with torch.inference_mode(False):
                variance, factor = post.covariance_factors()
                self._moments[index] = (
                    named(post.mean),
                    named(variance),
                    named(factor) if factor is not None else {},
                )
        return self._moments[index]

    def _linearization(self, index: int, post: GaussianPosterior, prepared: PreparedInputs) -> _Linearization:
        """The module of the batch at the SWA mean of posterior ``index`` (with its refreshed BatchNorm
        statistics when ``bn_loader`` is given)."""
        module, split = self._module(prepared)
        mean = self._posterior_moments(index, post)[0]
        buffers: Named = {}
        if self.batchnorm is not None:
            chunk = {name: value.unsqueeze(0) for name, value in mean.items()}
            refreshed = self.batchnorm.buffers(
                self.runner.model,
                chunk,
                ("linearized", index),
                self.runner.plan.vectorize or "auto",
                self.runner.split_candidate,
            )
            buffers = {name: value[0] for name, value in refreshed.items()}
        extract = self.runner.extractor(split)
        owner = type(self.runner.model).__name__ + ("" if split is None else f" (submodule {split.prefix!r})")
        return _Linearization(
            module,
            self._relative(mean, split),
            self._relative(buffers, split),
            extract,
            _as_call(prepared.inputs),
            owner,
        )


class _Linearization:
    """``module`` around the weights ``mean`` on the call ``arguments``: its output and per-example
    Jacobians (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        mean: Named,
        buffers: Named,
        extract: Callable[[Any], Any],
        arguments: CallArguments,
        owner: str,
    ) -> None:
        with torch.inference_mode(False):  # tensors made under inference mode cannot be saved for backward
            base = {name: p.detach() for name, p in module.named_parameters()}
            base = without_inference_tensors({**base, **dict(module.named_buffers()), **buffers})
            self.mean = without_inference_tensors(mean)
            self.arguments = without_inference_tensors(arguments)
        self.owner = owner

        def fn(weights: Named, call: CallArguments) -> Tensor:
            state = {**base, **weights}
            out = extract(call_model(lambda *a, **kw: functional_call(module, state, a, kw), call))
            if not isinstance(out, Tensor):
                raise TypeError("predictive='linearized' needs the model's output to be one tensor.")
            return out

        self.fn = fn
        with torch.no_grad():
            self.out = fn(self.mean, self.arguments)
        self.batch = self.out.shape[0]
        self.outputs = math.prod(self.out.shape[1:])
        self.dims = _batch_dims(self.arguments, self.batch)
        if all(d is None for d in (*self.dims.args, *self.dims.kwargs.values())):
            raise TypeError(
                f"predictive='linearized' found no model argument with the batch ({self.batch}) as its first "
                "dimension."
            )

    def jacobians(self) -> Iterator[tuple[slice, Tensor]]:
        """``(index of the examples, Jacobians [b, O, P])`` over chunks of the batch: ``O`` the output
        elements of an example, ``P`` the weights of ``mean`` flattened in its order, in the work
        dtype; at most :data:`JACOBIAN_BYTES` at once (``vmap`` over the examples, else a loop)."""
        work = _work_dtype(self.out)
        per_example = 3 * self.outputs * sum(v.numel() for v in self.mean.values())
        size = max(1, min(self.batch, JACOBIAN_BYTES // max(per_example * work.itemsize, 1)))
        vectorized = True
        for start in range(0, self.batch, size):
            stop = min(start + size, self.batch)
            with torch.inference_mode(False), torch.enable_grad():
                if vectorized:
                    try:
                        examples = _slice(self.arguments, self.dims, start, stop)
                        jac = vmap(self._single, in_dims=(self.dims,))(examples)
                    except Exception:  # noqa: BLE001 - any tracing failure: one example at a time
                        vectorized = False
                if not vectorized:
                    jac = torch.stack([self._looped(i) for i in range(start, stop)])
            yield slice(start, stop), jac.to(work)

    def _single(self, example: CallArguments) -> Tensor:
        """The Jacobian ``[O, P]`` of one example (inside ``vmap``: its batch dimension removed)."""
        call = _unsqueezed(example, self.dims)
        return _flat_jacobian(jacrev(lambda w: self.fn(w, call).squeeze(0))(self.mean), self.outputs)

    def _looped(self, i: int) -> Tensor:
        try:
            call = _slice(self.arguments, self.dims, i, i + 1)
            return _flat_jacobian(jacrev(lambda w: self.fn(w, call).squeeze(0))(self.mean), self.outputs)
        except Exception as err:
            raise ValueError(
                f"predictive='linearized' cannot differentiate {self.owner} with respect to the tracked "
                f"weights ({type(err).__name__}: {err}). Use predictive='sampled'."
            ) from err


def _flat_jacobian(jacobians: Named, outputs: int) -> Tensor:
    """Per-parameter Jacobians ``[*out, *param]`` of ``outputs`` elements as one ``[O, P]`` (in order)."""
    return torch.cat([jac.reshape(outputs, -1) for jac in jacobians.values()], dim=-1)


def _flatten(tensors: Named, dtype: torch.dtype, leading: int = 0) -> Tensor:
    """``tensors`` (each ``[*lead, *shape]``) as one ``[*lead, P]`` in ``dtype``, in their order."""
    return torch.cat([v.reshape(*v.shape[:leading], -1).to(dtype) for v in tensors.values()], dim=-1)


def _check_cost(out: Tensor, num_samples: int) -> None:
    """Refuse when the Jacobians would cost far more than sampling (see :data:`COST_RATIO_LIMIT`)."""
    per_example = math.prod(out.shape[1:])
    cost = 3 * per_example  # a backward pass per output element
    budget = COST_RATIO_LIMIT * max(num_samples, 30)
    if cost > budget:
        raise ValueError(
            "predictive='linearized' on a module that is not linear in its weights needs the exact Jacobian: "
            f"{per_example} backward passes per example (one per output element), about {cost} forward passes "
            f"per batch, against {num_samples} for the sampled predictive. Use predictive='sampled', or put the "
            "posterior on a linear last layer (SWAGCallback(include=[...]))."
        )


def _linear_axis(module: nn.Module, tracked: Iterable[str], plain_output: bool) -> int | None:
    """The feature axis (counted from the end) of ``module`` when its ``tracked`` parameters are its
    weight (and bias) and its output is used as it is (``plain_output``: no ``output_transform``):
    ``-1`` for one ``nn.Linear``, the channel axis for a convolution with all-ones kernels, stride 1,
    no padding and one group (linear per position); ``None`` otherwise."""
    if not plain_output or "weight" not in set(tracked):
        return None
    if type(module) is nn.Linear:
        return -1
    if type(module) in _CONVOLUTIONS:
        conv: nn.Conv1d | nn.Conv2d | nn.Conv3d = module  # type: ignore[assignment]
        unpadded = conv.padding in ("valid", "same") or all(p == 0 for p in conv.padding)  # type: ignore[union-attr]
        if (
            all(k == 1 for k in conv.kernel_size)
            and all(s == 1 for s in conv.stride)
            and conv.groups == 1
            and unpadded
        ):
            return -(len(conv.kernel_size) + 1)
    return None


def _as_call(inputs: Any) -> CallArguments:
    """Inputs as the call arguments :func:`~lightning_swag.predictive.batches.call_model` passes (a mapping as
    keywords, a tuple as positional arguments, anything else as the one argument); every argument
    must be a tensor or a value without tensors inside (per-example Jacobians cut the tensors)."""
    if isinstance(inputs, CallArguments):
        arguments = inputs
    elif isinstance(inputs, Mapping):
        arguments = CallArguments((), dict(inputs))
    elif isinstance(inputs, tuple):
        arguments = CallArguments(inputs, {})
    else:
        arguments = CallArguments((inputs,), {})
    for value in (*arguments.args, *arguments.kwargs.values()):
        if isinstance(value, (list, tuple, Mapping)) and any(
            isinstance(v, Tensor) for v in (value.values() if isinstance(value, Mapping) else value)
        ):
            raise TypeError(
                "predictive='linearized' needs every model argument to be a tensor (or a value without tensors "
                "inside); got a nested structure of tensors. Use predictive='sampled'."
            )
    return arguments


def _work_dtype(out: Tensor) -> torch.dtype:
    """The dtype of the variances: float64 for a float64 model, float32 otherwise."""
    return torch.float64 if out.dtype == torch.float64 else torch.float32


def _linear_moments(
    module: nn.Module, axis: int, inputs: Any, mean: Named, variance: Named, deviations: Named | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Exact output mean, diagonal term and low-rank term (of the factor rows ``deviations``) of a
    module that is linear per position along its feature ``axis`` (see :func:`_linear_axis`)."""
    arguments = _as_call(inputs)
    if len(arguments.args) != 1 or arguments.kwargs or not isinstance(arguments.args[0], Tensor):
        raise TypeError("A linear layer takes one tensor; got its call arguments in another form.")
    phi = arguments.args[0].movedim(axis, -1)  # features last
    weight = mean["weight"].reshape(mean["weight"].shape[0], -1)  # [C, F] (a 1x1 kernel's [C, F, 1, 1])
    own_bias = getattr(module, "bias", None)
    bias = mean.get("bias", own_bias.detach() if isinstance(own_bias, Tensor) else None)
    out = nn.functional.linear(phi, weight, bias)
    work = _work_dtype(out)
    phi_w = phi.to(work)
    var_w = variance["weight"].reshape(weight.shape).to(work)
    diag = nn.functional.linear(phi_w.square(), var_w)
    if "bias" in variance:
        diag = diag + variance["bias"].to(work)
    low = None
    if deviations:
        rows = {
            name: value.reshape(value.shape[0], weight.shape[0], -1) if name == "weight" else value
            for name, value in deviations.items()
        }
        low = _linear_low_rank(phi_w, rows, work).movedim(-1, axis)
    return out.movedim(-1, axis), diag.movedim(-1, axis), low


def _linear_low_rank(phi: Tensor, deviations: Named, work: torch.dtype) -> Tensor:
    """``Σ_j (φ·D_j + b_j)²`` per output element over the deviation rows ``j`` of a linear layer, a
    few rows at a time (at most :data:`COLUMN_BYTES` of columns at once)."""
    rows_w = deviations["weight"]  # [k, C, F]
    rows_b = deviations.get("bias")  # [k, C]
    k, classes, features = rows_w.shape
    flat = phi.reshape(-1, features)  # [N, F]
    step = max(1, min(k, COLUMN_BYTES // max(flat.shape[0] * classes * flat.element_size(), 1)))
    total = torch.zeros(flat.shape[0], classes, dtype=work, device=phi.device)
    for start in range(0, k, step):
        block = rows_w[start : start + step].to(work)
        n = block.shape[0]
        if rows_b is None:
            columns = flat @ block.reshape(n * classes, features).T  # one GEMM, no copy of the rows
        else:
            bias = rows_b[start : start + step].to(work).reshape(1, n * classes)
            columns = torch.addmm(bias, flat, block.reshape(n * classes, features).T)
        total += columns.square_().reshape(-1, n, classes).sum(dim=1)
    return total.reshape(*phi.shape[:-1], classes)


def _batch_dims(arguments: CallArguments, batch: int) -> CallArguments:
    """Per argument: 0 for tensors with the batch first, ``None`` for the rest (passed whole)."""

    def dim(value: Any) -> int | None:
        return 0 if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch else None

    return CallArguments(
        tuple(dim(a) for a in arguments.args), {k: dim(v) for k, v in arguments.kwargs.items()}
    )


def _slice(arguments: CallArguments, dims: CallArguments, start: int, stop: int) -> CallArguments:
    """The examples ``start:stop`` of the batched arguments; the others as they are."""

    def cut(value: Any, dim: int | None) -> Any:
        return value[start:stop] if dim == 0 else value

    return CallArguments(
        tuple(cut(a, d) for a, d in zip(arguments.args, dims.args, strict=True)),
        {k: cut(v, dims.kwargs[k]) for k, v in arguments.kwargs.items()},
    )


def _unsqueezed(example: CallArguments, dims: CallArguments) -> CallArguments:
    """One example inside ``vmap`` (its batched arguments without the batch dimension) as a batch of one."""

    def add(value: Any, dim: int | None) -> Any:
        return value.unsqueeze(0) if dim == 0 else value

    return CallArguments(
        tuple(add(a, d) for a, d in zip(example.args, dims.args, strict=True)),
        {k: add(v, dims.kwargs[k]) for k, v in example.kwargs.items()},
    )
