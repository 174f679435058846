"""Predictives: the BMA of a batch (see :mod:`lightning_swag.predictive.base` for the protocol).

:func:`build_predictive` is the one place that maps ``SWAGModule(predictive=...)`` to a class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_swag.likelihoods import Likelihood
from lightning_swag.posterior.swag import SWAGPosterior
from lightning_swag.predictive.base import Predictive, RunState
from lightning_swag.predictive.batchnorm import BatchNormRefresh
from lightning_swag.predictive.linearized import LinearizedPredictive
from lightning_swag.predictive.runner import ModelRunner
from lightning_swag.predictive.sampled import SampledPredictive, stack_outputs
from lightning_swag.predictive.weights import WeightStream

__all__ = [
    "LinearizedPredictive",
    "Predictive",
    "RunState",
    "SampledPredictive",
    "build_predictive",
    "stack_outputs",
]


def build_predictive(
    kind: str,
    likelihood: Likelihood,
    posteriors: Sequence[SWAGPosterior],
    model: nn.Module,
    runner_options: dict[str, Any],
    batchnorm: BatchNormRefresh | None,
    progress: Callable[..., Any] | None,
    link_approx: str = "probit",
) -> Predictive:
    """The predictive ``kind`` (``"sampled"`` or ``"linearized"``) over ``posteriors`` of ``model``."""
    stream = WeightStream(posteriors, model)
    in_place = any(post.layout.forward_in_place for post in posteriors)
    runner = ModelRunner(
        model,
        stream.tracked_names,
        accepts_pairs=likelihood.accepts_pairs,
        in_place=in_place,
        **runner_options,
    )
    if kind == "linearized":
        return LinearizedPredictive(likelihood, stream, runner, batchnorm, link_approx)
    return SampledPredictive(likelihood, stream, runner, batchnorm, progress)
