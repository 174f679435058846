"""The likelihood protocol's shared parts: the probability mixture, dict-valued metrics, the defaults."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import Metric

from lightning_swag.likelihoods.likelihood import Likelihood, mixture_of_probabilities, values_of
from lightning_swag.likelihoods.likelihood import TestMetrics as Metrics  # not a test class for pytest


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.log()).sum(dim=-1)


def test_mixture_of_probabilities_against_explicit_sums() -> None:
    probs = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    probs /= probs.sum(dim=-1, keepdim=True)
    out = mixture_of_probabilities(probs, _entropy)
    mean = (probs[0] + probs[1] + probs[2]) / 3
    torch.testing.assert_close(out["mean"], mean)
    torch.testing.assert_close(out["entropy"], _entropy(mean))
    spread = sum((probs[j] - mean) ** 2 for j in range(3)) / 3
    torch.testing.assert_close(out["std"], spread.sqrt())
    mutual = _entropy(mean) - sum(_entropy(probs[j]) for j in range(3)) / 3
    torch.testing.assert_close(out["mutual_information"], mutual)
    assert bool((out["mutual_information"] >= 0).all())  # Jensen: the mixture is the most uncertain


def test_one_component_has_no_spread_entries() -> None:
    probs = torch.softmax(torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert set(mixture_of_probabilities(probs, _entropy)) == {"mean", "entropy"}


class Totals(Metric):
    """A dict-valued metric: the sum and the count of what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"total": self.total, "count": self.count}


def test_metric_values_read_their_source_and_reset_it() -> None:
    source = Totals()
    metrics = Metrics({"source": source}, values_of(source, ("total", "count")))
    for batch in (torch.tensor([1.0, 2.0]), torch.tensor([4.0])):
        metrics.sources["source"].update(batch)
        metrics.count_batch()
    assert float(metrics.logged["total"].compute()) == 7.0 and int(metrics.logged["count"].compute()) == 3
    assert list(metrics.sources) == ["source"] and list(metrics.logged) == ["total", "count"]
    assert len(list(metrics.logged["total"].children())) == 0  # the source is not a child: synced once
    metrics.logged["total"].reset()
    metrics.sources["source"].update(torch.tensor([5.0]))
    metrics.count_batch()
    assert float(metrics.logged["total"].compute()) == 5.0


class Constant(Likelihood):
    """The smallest likelihood: every abstract method, nothing else."""

    task = "constant"

    def summarize(self, chunks):
        return {"mean": torch.cat(list(chunks)).mean(dim=0)}

    def summarize_gaussian(self, mean, variance):
        return {"mean": mean.mean(dim=0)}

    def test_metrics(self, summary):
        return Metrics({}, {})

    def update_test_metrics(self, metrics, summary, targets):
        pass

    def held_out_score(self, summaries, targets):
        return 0.0, {}


def test_a_subclass_needs_every_abstract_method_and_gets_the_defaults() -> None:
    class Incomplete(Likelihood):
        task = "incomplete"

        def summarize(self, chunks):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]
    likelihood = Constant()
    outputs = torch.randn(3, 2, 4)
    assert likelihood.sample_entries(outputs)["samples"] is outputs
    pair = (outputs, outputs.exp())
    assert likelihood.sample_entries(pair)["samples"] is outputs
    assert likelihood.check_outputs(outputs) is None
    assert likelihood.describe() == "constant"
    assert not likelihood.accepts_pairs and not likelihood.needs_samples
    torch.testing.assert_close(likelihood.summarize([outputs[:1], outputs[1:]])["mean"], outputs.mean(dim=0))
