"""The sampled predictive: the BMA of the model's outputs under each weight sample, loaded by hand here."""

from __future__ import annotations

import copy
import dataclasses

import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag.likelihoods import Categorical, GaussianNoise
from lightning_swag.predictive.base import RunState
from lightning_swag.predictive.runner import ModelRunner
from lightning_swag.predictive.sampled import SampledPredictive, stack_outputs
from lightning_swag.predictive.weights import SamplingSpec, WeightStream


def _spec(num_samples: int, chunk_size: int | None) -> SamplingSpec:
    """A full-covariance spec at scale 1 (only the fields that stay in the redesign are named)."""
    fields = {f.name for f in dataclasses.fields(SamplingSpec)}
    extra = {"diagonal_only": False} if "diagonal_only" in fields else {}
    return SamplingSpec(num_samples=num_samples, scale=1.0, chunk_size=chunk_size, **extra)


def _predictive(model: nn.Module, likelihood, seed: int = 0) -> SampledPredictive:
    post = random_walk_posterior(model, snapshots=5, max_rank=3, seed=seed)
    stream = WeightStream([post], model)
    runner = ModelRunner(
        model,
        stream.tracked_names,
        output_transform=None,
        accepts_pairs=likelihood.accepts_pairs,
        vectorize="loop",
        memory_format="preserve",
        split_forward=False,
        in_place=False,
    )
    return SampledPredictive(likelihood, stream, runner)


def _by_hand(model: nn.Module, predictive: SampledPredictive, run: RunState, x: torch.Tensor) -> torch.Tensor:
    """``[S, B, ...]``: the model with each of the run's weight samples written into a copy of it."""
    chunks = list(WeightStream(predictive.stream.posteriors, model).chunks(run.spec, run.seed))
    outputs = []
    for chunk in chunks:
        for s in range(next(iter(chunk.values())).shape[0]):
            copied = copy.deepcopy(model)
            with torch.no_grad():
                for name, p in copied.named_parameters():
                    p.copy_(chunk[name][s])
            outputs.append(copied(x))
    return torch.stack(outputs)


def _net(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, outputs))


def test_classification_bma_is_the_mean_of_the_samples_softmax() -> None:
    model, x = _net(3), torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    predictive = _predictive(model, Categorical())
    run = RunState(_spec(9, 4), seed=5)
    out = predictive.predict(x, run, keep_samples=False)
    probs = torch.softmax(_by_hand(model, predictive, run, x), dim=-1)
    torch.testing.assert_close(out["mean"], probs.mean(0))
    torch.testing.assert_close(out["std"], probs.std(0, correction=0), atol=1e-6, rtol=1e-4)
    assert "samples" not in out
    kept = predictive.predict(x, run, keep_samples=True)
    torch.testing.assert_close(kept["samples"], _by_hand(model, predictive, run, x))
    torch.testing.assert_close(kept["mean"], out["mean"])


def test_the_summary_does_not_depend_on_the_chunk_size_and_outputs_come_in_sample_order() -> None:
    model, x = _net(1), torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    predictive = _predictive(model, GaussianNoise(0.2), seed=1)
    chunked, whole = RunState(_spec(7, 3), seed=3), RunState(_spec(7, None), seed=3)
    parts = list(predictive.outputs(x, chunked))
    assert [p.shape[0] for p in parts] == [3, 3, 1]
    torch.testing.assert_close(torch.cat(parts), _by_hand(model, predictive, whole, x))
    a, b = predictive.predict(x, chunked, False), predictive.predict(x, whole, False)
    for key in ("mean", "std", "epistemic_std", "aleatoric_std"):
        torch.testing.assert_close(a[key], b[key])
    means, variances = predictive.components(x, whole)
    torch.testing.assert_close(means, torch.cat(parts))
    assert variances is None


def test_reset_forgets_the_cached_samples() -> None:
    model, x = _net(2), torch.randn(3, 4)
    predictive = _predictive(model, Categorical(), seed=2)
    run = RunState(_spec(4, None), seed=0)
    predictive.predict(x, run, keep_samples=False)
    cached = predictive.stream.chunks(run.spec, run.seed)
    assert predictive.stream.chunks(run.spec, run.seed) is cached
    predictive.reset()
    again = predictive.stream.chunks(run.spec, run.seed)
    assert again is not cached
    assert not predictive.collective_forwards(run.spec)  # an unsharded posterior: no collectives


def test_stack_outputs_joins_chunks_of_tensors_and_of_pairs() -> None:
    a, b = torch.randn(2, 3), torch.randn(1, 3)
    assert stack_outputs([a]) is a
    torch.testing.assert_close(stack_outputs([a, b]), torch.cat([a, b]))
    pairs = stack_outputs([(a, a.exp()), (b, b.exp())])
    assert isinstance(pairs, tuple)
    torch.testing.assert_close(pairs[0], torch.cat([a, b]))
    torch.testing.assert_close(pairs[1], torch.cat([a, b]).exp())
