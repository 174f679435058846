"""The predictive protocol: the Bayesian model average of one batch.

A :class:`Predictive` turns a batch's inputs into the summary its likelihood defines (``mean``,
``std``, ...). :class:`~lightning_swag.predictive.sampled.SampledPredictive` averages over weight
samples; :class:`~lightning_swag.predictive.linearized.LinearizedPredictive` linearises the
outputs around the SWA mean and needs none. ``SWAGModule``, ``tune_scale`` and ``fit_noise`` only
call :meth:`Predictive.predict`, so a new predictive is one subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swag.likelihoods import Likelihood, Outputs
from lightning_swag.posterior.protocol import layout_of
from lightning_swag.predictive.batchnorm import BatchNormRefresh
from lightning_swag.predictive.runner import ModelRunner
from lightning_swag.predictive.weights import SamplingSpec, WeightStream

__all__ = ["Predictive", "PredictiveContext", "RunState"]


@dataclass(frozen=True)
class PredictiveContext:
    """What a predictive is built from (a factory passed as ``SWAGModule(predictive=factory)`` gets
    one): the likelihood, the posteriors and the model, with the module's options for running it."""

    likelihood: Likelihood
    posteriors: Sequence[Any]
    model: nn.Module
    runner_options: Mapping[str, Any] = field(default_factory=dict)
    """``output_transform``, ``vectorize``, ``memory_format``, ``split_forward`` (see :class:`ModelRunner`;
    those left out take its defaults)."""
    batchnorm: BatchNormRefresh | None = None
    """Recomputes BatchNorm statistics for given weights (``bn_loader``), or ``None``."""
    progress: Callable[..., Iterable[Any]] | None = None
    link_approx: str = "probit"

    def stream(self) -> WeightStream:
        """The weight samples of the posteriors, as the model's tensors."""
        return WeightStream(self.posteriors, self.model)

    def runner(self, stream: WeightStream) -> ModelRunner:
        """Runs the model (or the split submodule) under chunks of ``stream``'s samples."""
        return ModelRunner(
            self.model,
            stream.tracked_names,
            accepts_pairs=self.likelihood.accepts_pairs,
            in_place=any(layout_of(post).forward_in_place for post in self.posteriors),
            **self.runner_options,
        )


@dataclass(frozen=True)
class RunState:
    """What a run fixes for every batch: the sampling options and the run seed."""

    spec: SamplingSpec
    seed: int


class Predictive(ABC):
    """The BMA of a batch (see the module docstring).

    Args:
        likelihood: what the outputs mean (the task).
    """

    name: str = "predictive"

    def __init__(self, likelihood: Likelihood) -> None:
        self.likelihood = likelihood

    @abstractmethod
    def predict(self, inputs: Any, run: RunState, keep_samples: bool) -> dict[str, Tensor]:
        """The summary of the predictive at ``inputs`` (``keep_samples``: with per-sample entries,
        ``samples`` ``[S, B, ...]``, where the predictive has samples)."""

    uses_weight_samples: bool = True
    """Whether :meth:`predict` averages over the run's weight samples (``num_samples`` per posterior)."""

    @abstractmethod
    def outputs(self, inputs: Any, run: RunState) -> Iterator[Outputs]:
        """The outputs ``[n, B, ...]`` at ``inputs`` under the run's weight samples (the same samples
        whatever the batches or processes), chunk by chunk in sample order."""

    def components(self, inputs: Any, run: RunState) -> tuple[Tensor, Tensor | None]:
        """The equal-weight components of the predictive over the outputs at ``inputs``: their means
        ``[J, B, ...]`` and their own variances of the same shape, or ``None`` where each component
        is one output (default: the outputs of the weight samples). ``fit_noise`` adds σ² to them."""
        parts = list(self.outputs(inputs, run))
        means = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # type: ignore[arg-type]
        return means, None  # type: ignore[return-value]

    def collective_forwards(self, spec: SamplingSpec) -> bool:
        """Whether every batch runs collectives (sharded posteriors), so that the processes must run
        the same number of batches (see :mod:`lightning_swag.lightning.lockstep`)."""
        return False

    def start_run(self, run: RunState) -> None:  # noqa: B027 - optional hook
        """Called on every process at the start of a ``trainer.predict`` / ``test`` run."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget what was kept between batches of a run (cached samples)."""

    @property
    def plan(self) -> Any:
        """How the forward passes run (see :class:`~lightning_swag.predictive.runner.ExecutionPlan`)."""
        return None
