"""The linearised predictive: outputs linear in the tracked weights around the SWA mean.

With ``f(θ) ≈ f(θ̄) + J (θ − θ̄)`` and the SWAG Gaussian ``θ ~ N(θ̄, scale · (diag(var) + D̂ᵀD̂ / (k − 1)))``,
the outputs are Gaussian: ``N(f(θ̄), scale · (J diag(var) Jᵀ + (J D̂ᵀ)(J D̂ᵀ)ᵀ / (k − 1)))``. Only the
diagonal of that covariance is used (one variance per output element), and no weight is sampled.
The low-rank term is used when ``k >= 2`` and ``covariance="low_rank"``, as in sampling.

* **A linear layer** (the split submodule is one ``nn.Linear``, the usual last-layer posterior) is
  exact and costs about one forward pass: with features ``φ``, the diagonal term is
  ``Σ_j var[c, j] φ_j² + var_b[c]`` and each of the ``k`` low-rank columns is the layer applied to
  ``φ`` with a deviation row as its weights.
* **Anything else**: the low-rank term takes one Jacobian-vector product per deviation row
  (``torch.func.jvp``, vectorised over the rows); the diagonal term is exact, from the per-example
  Jacobian (``jacrev``, one backward pass per output element of an example, vectorised over the
  batch in chunks of bounded memory). The examples of a batch must be independent (eval mode); an
  argument is cut into examples when its first dimension is the batch size (that of the output),
  any other argument is passed whole to every example. When
  that would cost far more than the sampled predictive, an error says so, with the estimate.

The likelihood turns the Gaussian into the BMA summary (the probit approximation or Monte Carlo
over logits for classification). MultiSWAG gives a mixture of one Gaussian per posterior. Sharded
posteriors are refused: gather them first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from lightning_swag.batches import CallArguments, call_model
from lightning_swag.likelihoods import Likelihood
from lightning_swag.posterior import SWAGPosterior
from lightning_swag.predictives.base import Predictive, RunState
from lightning_swag.runner import ExecutionPlan, ModelRunner
from lightning_swag.weights import WeightStream

__all__ = ["COST_RATIO_LIMIT", "JACOBIAN_BYTES", "LinearizedPredictive"]

COST_RATIO_LIMIT = 10
"""The linearised predictive is refused when its estimated cost exceeds this many times that of the
sampled predictive with the same ``num_samples`` (at least 30)."""
JACOBIAN_BYTES = 256 * 2**20
"""Upper bound on the bytes of the per-example Jacobians held at once (the batch is cut in chunks)."""

Named = dict[str, Tensor]
Function = Callable[[Named, CallArguments], Tensor]


class LinearizedPredictive(Predictive):
    """The Gaussian predictive of the linearised outputs (see the module docstring).

    Args:
        likelihood: what the outputs mean.
        stream: gives the posteriors and the model's names and dtypes.
        runner: runs the model (the split submodule alone when the rest runs once per batch).
        link_approx: ``"probit"`` or ``"mc"`` (how the likelihood averages a nonlinear link).
    """

    name = "linearized"

    def __init__(
        self, likelihood: Likelihood, stream: WeightStream, runner: ModelRunner, link_approx: str = "probit"
    ) -> None:
        super().__init__(likelihood)
        first = stream.posteriors[0].param_names
        for i, post in enumerate(stream.posteriors):
            if post.is_sharded:
                raise ValueError(
                    f"predictive='linearized' needs whole posteriors, but posterior {i} keeps a "
                    f"{post.layout.describe()}: gather() it to one process, or use predictive='sampled'."
                )
            if post.param_names != first:
                raise ValueError(
                    f"predictive='linearized' needs posteriors over the same parameters, but posterior {i} "
                    "tracks other ones than posterior 0."
                )
        self.stream = stream
        self.runner = runner
        self.link_approx = link_approx
        self._moments: dict[int, tuple[Named, Named, Named]] = {}
        self._checked = False

    @property
    def plan(self) -> ExecutionPlan:
        return self.runner.plan

    def reset(self) -> None:
        self._moments = {}

    def predict(self, inputs: Any, run: RunState, keep_samples: bool) -> dict[str, Tensor]:
        self.runner.decide(inputs, self.stream.mean_weights)
        prepared = self.runner.prepare_inputs(inputs)
        moments = [
            self.output_moments(post, prepared, run.spec.scale, run.spec.diagonal_only, run.spec.num_samples)
            for post in self.stream.posteriors
        ]
        means = torch.stack([mean for mean, _ in moments])
        variances = torch.stack([variance for _, variance in moments])
        if not self._checked:
            self.likelihood.check_outputs(means)
            self._checked = True
        generator = torch.Generator(device=means.device).manual_seed(run.seed)
        summary = self.likelihood.summarize_gaussian(
            means, variances, self.link_approx, run.spec.num_samples, generator
        )
        if keep_samples:
            summary.setdefault("samples", means)  # one "sample" per posterior: its linearised mean
        return summary

    # ------------------------------------------------------------------ the Gaussian over the outputs
    def output_moments(
        self, post: SWAGPosterior, inputs: Any, scale: float, diagonal_only: bool, num_samples: int
    ) -> tuple[Tensor, Tensor]:
        """Mean ``f(θ̄)`` and the per-element variance of the linearised outputs on prepared ``inputs``."""
        mean, variance, deviations = self._posterior_moments(post)
        module, names = self._module()
        k = post.rank
        rows = deviations if k >= 2 and not diagonal_only else None
        linear = _as_linear(module, names)
        if linear is not None:
            out, diag, low = _linear_moments(linear, inputs, mean, variance, rows)
        else:
            fn = self._function(module)
            arguments = _as_call(inputs)
            with torch.no_grad():
                out = fn(mean, arguments)
            _check_cost(out, num_samples, k if rows is not None else 0)
            diag = _jacobian_diagonal(fn, mean, variance, arguments, out)
            low = _jvp_low_rank(fn, mean, rows, arguments) if rows is not None else None
        total = diag if low is None else diag + low / (k - 1)
        return out.to(total.dtype), total * scale

    def _module(self) -> tuple[nn.Module, dict[str, str]]:
        """The module run under the tracked weights and ``{its name: the model's name}`` of them."""
        split = self.runner.split
        if split is None:
            return self.runner.model, {n: n for n in self.stream.tracked_names}
        start = len(split.prefix) + 1
        return split.submodule, {n[start:]: n for n in self.stream.tracked_names}

    def _posterior_moments(self, post: SWAGPosterior) -> tuple[Named, Named, Named]:
        """Mean, variance and deviation rows of ``post`` as the module's tensors, each in its
        parameter's dtype on the model's device (cached for the run)."""
        key = id(post)
        if key not in self._moments:
            _, names = self._module()
            by_model = {model_name: own for own, model_name in names.items()}
            stream = self.stream

            def named(flat: Tensor) -> Named:
                parts = post.unflatten(flat.to(stream.device))
                return {by_model[stream.model_name(n)]: v.to(stream.model_dtype(n)) for n, v in parts.items()}

            self._moments[key] = (
                named(post.mean),
                named(post.variance),
                named(post.deviations) if post.rank else {},
            )
        return self._moments[key]

    def _function(self, module: nn.Module) -> Function:
        """``f(tracked weights, call arguments)``: ``module`` run with its other tensors as they are."""
        base = {name: p.detach() for name, p in module.named_parameters()}
        base.update(dict(module.named_buffers()))
        extract = self.runner.extract if self.runner.split is None else _identity

        def fn(weights: Named, arguments: CallArguments) -> Tensor:
            state = {**base, **weights}
            out = extract(call_model(lambda *a, **kw: functional_call(module, state, a, kw), arguments))
            if not isinstance(out, Tensor):
                raise TypeError("predictive='linearized' needs the model's output to be one tensor.")
            return out

        return fn


def _identity(value: Any) -> Any:
    return value


def _check_cost(out: Tensor, num_samples: int, rank: int) -> None:
    """Refuse when the exact diagonal would cost far more than sampling (see :data:`COST_RATIO_LIMIT`)."""
    per_example = math.prod(out.shape[1:])
    cost = 3 * per_example + 3 * rank  # a backward pass per output element, a JVP per deviation row
    budget = COST_RATIO_LIMIT * max(num_samples, 30)
    if cost > budget:
        raise ValueError(
            "predictive='linearized' on a module that is not one linear layer needs the exact Jacobian: "
            f"{per_example} backward passes per example (one per output element) plus {rank} "
            f"Jacobian-vector products, about {cost} forward passes per batch, against {num_samples} for the "
            "sampled predictive. Use predictive='sampled', or put the posterior on a linear last layer "
            "(SWAGCallback(include=[...]))."
        )


def _as_linear(module: nn.Module, names: Mapping[str, str]) -> nn.Linear | None:
    """``module`` when it is one ``nn.Linear`` whose tracked parameters are its weight (and bias)."""
    if type(module) is nn.Linear and "weight" in names and set(names) <= {"weight", "bias"}:
        return module
    return None


def _as_call(inputs: Any) -> CallArguments:
    """Inputs as the call arguments :func:`~lightning_swag.batches.call_model` passes (a mapping as
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


def _features(inputs: Any) -> Tensor:
    """The one tensor a linear layer is called with."""
    arguments = _as_call(inputs)
    if len(arguments.args) == 1 and not arguments.kwargs and isinstance(arguments.args[0], Tensor):
        return arguments.args[0]
    raise TypeError("A linear layer takes one tensor; got its call arguments in another form.")


def _work_dtype(out: Tensor) -> torch.dtype:
    """The dtype of the variances: float64 for a float64 model, float32 otherwise."""
    return torch.float64 if out.dtype == torch.float64 else torch.float32


def _linear_moments(
    linear: nn.Linear, inputs: Any, mean: Named, variance: Named, deviations: Named | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Exact output mean, diagonal term and (unnormalised) low-rank term of a linear layer."""
    phi = _features(inputs)
    bias = mean.get("bias", linear.bias.detach() if linear.bias is not None else None)
    out = nn.functional.linear(phi, mean["weight"], bias)
    work = _work_dtype(out)
    phi_w = phi.to(work)
    diag = nn.functional.linear(phi_w.square(), variance["weight"].to(work))
    if "bias" in variance:
        diag = diag + variance["bias"].to(work)
    if not deviations:
        return out, diag, None
    rows_w = deviations["weight"].to(work)  # [k, C, F]
    columns = torch.einsum("...f,kcf->k...c", phi_w, rows_w)
    if "bias" in deviations:
        rows_b = deviations["bias"].to(work)
        columns = columns + rows_b.reshape(rows_b.shape[0], *([1] * (phi.dim() - 1)), rows_b.shape[-1])
    return out, diag, columns.square().sum(dim=0)


def _batch_dims(arguments: CallArguments, batch: int) -> CallArguments:
    """``vmap`` in_dims: 0 for tensors with the batch first, ``None`` for the rest."""

    def dim(value: Any) -> int | None:
        return 0 if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch else None

    return CallArguments(
        tuple(dim(a) for a in arguments.args), {k: dim(v) for k, v in arguments.kwargs.items()}
    )


def _one_example(example: CallArguments, dims: CallArguments) -> CallArguments:
    """The arguments of one example (``vmap`` removed the batch dimension of those with a dim of 0)
    as a batch of one; the unbatched ones as they are."""

    def add(value: Any, dim: int | None) -> Any:
        return value.unsqueeze(0) if dim == 0 else value

    return CallArguments(
        tuple(add(a, d) for a, d in zip(example.args, dims.args, strict=True)),
        {k: add(v, dims.kwargs[k]) for k, v in example.kwargs.items()},
    )


def _jacobian_diagonal(
    fn: Function, mean: Named, variance: Named, arguments: CallArguments, out: Tensor
) -> Tensor:
    """``Σ_p var_p (∂f/∂θ_p)²`` per output element, from per-example Jacobians (``out = f(θ̄)``),
    vectorised over the batch in chunks of at most :data:`JACOBIAN_BYTES` of Jacobians."""
    batch = out.shape[0]
    dims = _batch_dims(arguments, batch)
    if all(d is None for d in (*dims.args, *dims.kwargs.values())):
        raise TypeError(
            f"predictive='linearized' found no model argument with the batch ({batch}) as its first dimension."
        )
    work = _work_dtype(out)
    weights = {name: variance[name].to(work) for name in mean}

    def single(example: CallArguments) -> Tensor:
        jacobians = jacrev(lambda w: fn(w, _one_example(example, dims)).squeeze(0))(mean)
        total = torch.zeros(out.shape[1:], dtype=work, device=out.device)
        for name, jac in jacobians.items():  # [*out per example, *param shape]
            param_dims = tuple(range(jac.dim() - weights[name].dim(), jac.dim()))
            total = total + (jac.to(work).square() * weights[name]).sum(dim=param_dims)
        return total

    per_example = math.prod(out.shape[1:]) * sum(v.numel() for v in mean.values()) * out.element_size()
    chunk = max(1, min(batch, JACOBIAN_BYTES // max(3 * per_example, 1)))
    return vmap(single, in_dims=(dims,), chunk_size=chunk)(arguments)


def _jvp_low_rank(fn: Function, mean: Named, deviations: Named, arguments: CallArguments) -> Tensor:
    """``Σ_j (J d_j)²`` per output element over the deviation rows ``d_j`` (one JVP per row,
    vectorised over the rows; a loop where ``vmap`` cannot trace the module)."""

    def column(tangent: Named) -> Tensor:
        return jvp(lambda w: fn(w, arguments), (mean,), (tangent,))[1]

    try:
        columns = vmap(column)(deviations)
    except Exception:  # noqa: BLE001 - any tracing failure: one JVP at a time
        rows = next(iter(deviations.values())).shape[0]
        columns = torch.stack([column({n: v[j] for n, v in deviations.items()}) for j in range(rows)])
    return columns.to(_work_dtype(columns)).square().sum(dim=0)
