"""``BMA``, the plain-torch engine: it equals ``SWAGModule`` for the same options and seed, and takes a
likelihood or a predictive of the user's own (defined here, not in the package) through
``trainer.predict`` and ``trainer.test``."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import pytest
import torch
from conftest import QUIET, random_walk_posterior
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from lightning_swag import BMA, SWAGModule
from lightning_swag.likelihoods import Likelihood, TestMetrics
from lightning_swag.predictive import Predictive, PredictiveContext, RunState


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def regressor() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))


def explicit_outputs(net: nn.Module, samples: Iterable[dict[str, Tensor]], x: Tensor) -> Tensor:
    """The model's outputs under every weight sample, the independent way: each sample loaded into a
    copy of the model, one forward pass each."""
    copy_net = copy.deepcopy(net).eval()
    params = dict(copy_net.named_parameters())
    outputs = []
    with torch.no_grad():
        for chunk in samples:
            for i in range(next(iter(chunk.values())).shape[0]):
                for name, value in chunk.items():
                    params[name].copy_(value[i])
                outputs.append(copy_net(x))
    return torch.stack(outputs)


OPTION_SETS = [
    {"task": "classification", "num_samples": 7, "seed": 3},
    {"task": "classification", "num_samples": 5, "seed": 1, "covariance": "diagonal", "return_samples": True},
    {"task": "classification", "predictive": "linearized", "link_approx": "mc", "num_samples": 6, "seed": 2},
    {"task": "regression", "num_samples": 6, "seed": 0, "noise": 0.3, "chunk_size": 2},
    {"task": "regression", "predictive": "linearized", "seed": 0},
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_bma_equals_swag_module_for_the_same_options_and_seed(options: dict[str, Any]) -> None:
    net = classifier() if options["task"] == "classification" else regressor()
    posts = [random_walk_posterior(net, seed=0), random_walk_posterior(net, seed=1)]
    x = torch.randn(9, 5)
    for posterior in (posts[0], posts):  # one posterior, and MultiSWAG
        engine = BMA(net, posterior, **options)
        module = SWAGModule(net, posterior, **options)
        expected = module(x)
        got = engine(x)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_bma_is_the_explicit_average_of_full_forward_passes() -> None:
    net = classifier()
    post = random_walk_posterior(net)
    x = torch.randn(6, 5)
    engine = BMA(net, post, task="classification", num_samples=8, seed=4)
    outputs = explicit_outputs(net, engine.iter_weight_samples(), x)
    torch.testing.assert_close(engine(x)["mean"], outputs.softmax(-1).mean(0), rtol=0, atol=1e-6)


def test_options_are_checked_when_set_and_take_effect() -> None:
    net = classifier()
    engine = BMA(net, random_walk_posterior(net), task="classification", num_samples=4, seed=0)
    x = torch.randn(3, 5)
    before = engine(x)["std"]
    engine.scale = 0.0
    assert bool((engine(x)["std"] == 0).all())  # scale 0: every sample is the SWA mean
    assert not bool((before == 0).all())
    with pytest.raises(ValueError, match="num_samples"):
        engine.num_samples = 0
    with pytest.raises(ValueError, match="predictive must be one of"):
        engine.predictive = "laplace"


# ---------------------------------------------------------------------- a likelihood of the user's own
class Poisson(Likelihood):
    """Counts: the model's output is a log-rate; the BMA rate averages ``exp`` over the samples."""

    task = "regression"

    def summarize(self, chunks: Iterable[Tensor]) -> dict[str, Tensor]:
        rates = torch.cat([log_rate.exp() for log_rate in chunks])
        return {"mean": rates.mean(0), "std": rates.std(0, correction=0)}

    def summarize_gaussian(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        first = (mean + variance / 2).exp().mean(0)  # E[exp(f)] of a mixture of Gaussians
        second = (2 * mean + 2 * variance).exp().mean(0)
        return {"mean": first, "std": (second - first.square()).clamp_min(0).sqrt()}

    @staticmethod
    def nll(rate: Tensor, counts: Tensor) -> Tensor:
        return rate - counts * rate.log() + torch.lgamma(counts + 1)

    def test_metrics(self, summary: dict[str, Tensor]) -> TestMetrics:
        return TestMetrics({}, {"poisson_nll": MeanMetric()})

    def update_test_metrics(self, metrics: TestMetrics, summary: dict[str, Tensor], targets: Any) -> None:
        metrics.logged["poisson_nll"].update(
            self.nll(summary["mean"], targets.reshape(summary["mean"].shape))
        )

    def held_out_score(self, summaries: list[dict[str, Tensor]], targets: list[Any]) -> tuple[float, dict]:
        values = [
            self.nll(s["mean"], t.reshape(s["mean"].shape)) for s, t in zip(summaries, targets, strict=True)
        ]
        return float(torch.cat([v.reshape(-1) for v in values]).mean()), {}


def test_a_likelihood_of_the_users_own_through_predict_and_test() -> None:
    net = regressor()
    post = random_walk_posterior(net, step=0.1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 5, generator=g)
    counts = torch.poisson(torch.full((20, 1), 2.0), generator=g)
    module = SWAGModule(net, post, task=Poisson(), num_samples=6, seed=2)
    loader = DataLoader(TensorDataset(x, counts), batch_size=8)
    predicted = L.Trainer(**QUIET).predict(module, loader)
    rates = explicit_outputs(net, module.iter_weight_samples(), x).exp()
    torch.testing.assert_close(torch.cat([p["mean"] for p in predicted]), rates.mean(0), rtol=1e-5, atol=1e-6)
    logged = L.Trainer(**QUIET).test(module, loader)[0]
    expected = float(Poisson.nll(rates.mean(0), counts).mean())
    assert logged["test_poisson_nll"] == pytest.approx(expected, rel=1e-5)
    scores = module.tune_scale(loader, scales=(0.0, 0.5))  # held-out scoring through the protocol
    assert set(scores) == {0.0, 0.5} and all(math.isfinite(v) for v in scores.values())
    with pytest.raises(ValueError, match="leave noise and class_dim unset"):
        SWAGModule(net, post, task=Poisson(), noise=0.3)


# ---------------------------------------------------------------------- a predictive of the user's own
class SWAOnly(Predictive):
    """The SWA model alone: the model run once at the posterior mean, no weight samples."""

    name = "swa"
    uses_weight_samples = False

    def __init__(self, context: PredictiveContext) -> None:
        super().__init__(context.likelihood)
        self.stream = context.stream()
        self.runner = context.runner(self.stream)

    def outputs(self, inputs: Any, run: RunState) -> Iterator[Tensor]:
        self.runner.decide(inputs, self.stream.mean_weights)
        yield self.runner.run(self.stream.mean_weights(), self.runner.prepare_inputs(inputs), {})

    def predict(self, inputs: Any, run: RunState, keep_samples: bool) -> dict[str, Tensor]:
        return self.likelihood.summarize(self.outputs(inputs, run))


def test_a_predictive_of_the_users_own_as_a_factory_and_as_an_instance() -> None:
    net = classifier()
    post = random_walk_posterior(net)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    swa = copy.deepcopy(net).eval()
    post.load_into(swa)
    with torch.no_grad():
        expected = swa(x).softmax(-1)
    module = SWAGModule(net, post, task="classification", predictive=SWAOnly)  # a factory: the class
    predicted = torch.cat([p["mean"] for p in L.Trainer(**QUIET).predict(module, loader)])
    torch.testing.assert_close(predicted, expected, rtol=1e-6, atol=1e-6)
    assert module.total_samples == 0
    tested = L.Trainer(**QUIET).test(module, loader)[0]
    accuracy = float((expected.argmax(-1) == y).float().mean())
    assert tested["test_accuracy"] == pytest.approx(accuracy)
    engine = BMA(net, post, task="classification")  # an instance, built from the engine's context
    engine.predictive = SWAOnly(
        PredictiveContext(engine.likelihood, engine.posteriors, engine.model, {"vectorize": "loop"})
    )
    torch.testing.assert_close(engine(x)["mean"], expected, rtol=1e-6, atol=1e-6)


def test_tune_scale_keeps_the_predictive_and_every_scale_equals_a_fresh_engine() -> None:
    net = classifier()
    post = random_walk_posterior(net)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    engine = BMA(net, post, task="classification", num_samples=6, seed=1)
    engine(x)
    built = engine.predictor
    scores = engine.tune_scale([(x, y)], scales=(0.25, 1.0))
    assert engine.predictor is built  # no rebuild (no new split check) per candidate
    for scale in scores:
        engine.scale = scale
        fresh = BMA(net, post, task="classification", num_samples=6, seed=1, scale=scale)
        for key, value in fresh(x).items():
            torch.testing.assert_close(engine(x)[key], value, rtol=0, atol=0, msg=key)
