"""The predictive protocol (lightning_swag.predictive.base) and its registry: what a factory gets in a
``PredictiveContext``, the default ``components``, and how names, factories and instances resolve."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import random_walk_posterior
from torch import Tensor, nn

from lightning_swag.likelihoods import Categorical
from lightning_swag.predictive import (
    PREDICTIVES,
    LinearizedPredictive,
    Predictive,
    PredictiveContext,
    RunState,
    SampledPredictive,
    build_predictive,
)
from lightning_swag.predictive.weights import SamplingSpec


def context(**options: Any) -> PredictiveContext:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return PredictiveContext(Categorical(), [random_walk_posterior(net)], net, options)


class Constant(Predictive):
    """Two fixed 'samples' whatever the inputs: exercises the protocol's defaults."""

    def outputs(self, inputs: Any, run: RunState) -> Iterator[Tensor]:
        yield torch.zeros(1, len(inputs), 3)
        yield torch.ones(1, len(inputs), 3)

    def predict(self, inputs: Any, run: RunState, keep_samples: bool) -> dict[str, Tensor]:
        return self.likelihood.summarize(self.outputs(inputs, run))


def test_the_context_builds_the_stream_and_runner_of_the_built_in_predictives() -> None:
    ctx = context(vectorize="loop", split_forward=False)
    stream = ctx.stream()
    assert stream.tracked_names == [name for name, _ in ctx.model.named_parameters()]
    runner = ctx.runner(stream)
    x = torch.randn(5, 4)
    runner.decide(x, stream.mean_weights)
    chunk = next(iter(stream.chunks(SamplingSpec(num_samples=2, scale=0.5, chunk_size=None), 0)))
    out = runner.run(chunk, runner.prepare_inputs(x), {})
    assert out.shape == (2, 5, 3)
    assert runner.plan.vectorize == "loop" and runner.plan.split is None
    assert PredictiveContext(Categorical(), ctx.posteriors, ctx.model).runner_options == {}  # defaults


def test_names_factories_and_instances_resolve_to_predictives() -> None:
    ctx = context()
    assert isinstance(build_predictive("sampled", ctx), SampledPredictive)
    assert isinstance(build_predictive("linearized", ctx), LinearizedPredictive)
    assert set(PREDICTIVES) == {"sampled", "linearized"}
    instance = Constant(ctx.likelihood)
    assert build_predictive(instance, ctx) is instance
    assert isinstance(build_predictive(lambda c: Constant(c.likelihood), ctx), Constant)
    with pytest.raises(TypeError, match="returned a str, not a Predictive"):
        build_predictive(lambda c: "not a predictive", ctx)


def test_the_default_components_are_the_outputs_of_every_sample_without_variances() -> None:
    predictive = Constant(Categorical())
    run = RunState(SamplingSpec(num_samples=2, scale=0.5, chunk_size=None), seed=0)
    means, variances = predictive.components(torch.randn(4, 4), run)
    assert variances is None
    torch.testing.assert_close(means, torch.stack([torch.zeros(4, 3), torch.ones(4, 3)]))
    assert predictive.uses_weight_samples and not predictive.collective_forwards(run.spec)
    assert predictive.plan is None
