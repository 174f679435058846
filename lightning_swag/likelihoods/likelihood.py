"""The likelihood protocol: what a task makes of the model's outputs.

A :class:`Likelihood` turns the outputs of the weight samples into the Bayesian model average
(:meth:`Likelihood.summarize`, chunk by chunk so memory stays bounded), turns a Gaussian over the
outputs into the same summary (:meth:`Likelihood.summarize_gaussian`, for the linearised
predictive), scores held-out data for ``tune_scale`` and keeps the ``trainer.test`` metrics. A new
task is one subclass; nothing else branches on the task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, ItemsView, Iterable, Mapping, ValuesView
from typing import Any, ClassVar, Literal, cast

from torch import Tensor, nn
from torchmetrics import Metric

__all__ = [
    "PER_SAMPLE_KEYS",
    "LinkApprox",
    "Likelihood",
    "MetricValue",
    "Outputs",
    "TestMetrics",
    "mixture_of_probabilities",
    "values_of",
]

PER_SAMPLE_KEYS = ("samples", "sample_variances")
"""The entries of a BMA summary that hold one value per weight sample (``[S, B, ...]``)."""

Outputs = Tensor | tuple[Tensor, Tensor]
"""The stacked outputs ``[S, B, ...]`` of a chunk of weight samples (a ``(mean, variance)`` pair of
such tensors for a heteroscedastic ``output_transform``)."""
LinkApprox = Literal["probit", "mc"]
"""How the linearised predictive averages a nonlinear link: the closed form
(:meth:`Likelihood.summarize_gaussian`) or the linearised outputs under weight samples."""


class MetricValue(Metric):
    """One value of a dict-valued metric, so that Lightning can log it per dataloader with
    ``self.log``; ``update`` only counts, the source holds the state."""

    full_state_update = False

    def __init__(self, source: Metric, key: str) -> None:
        super().__init__()
        self._source = [source]  # a list: not registered as a child module, not synced twice
        self.key = key

    def update(self) -> None:
        """Nothing to accumulate: the source metric is updated by its owner."""

    def compute(self) -> Tensor:
        return self._source[0].compute()[self.key]

    def reset(self) -> None:
        super().reset()
        self._source[0].reset()


class _MetricDict(nn.ModuleDict):
    """An ``nn.ModuleDict`` of torchmetrics ``Metric`` values, typed as such for type checkers."""

    def __getitem__(self, key: str) -> Metric:
        return cast(Metric, super().__getitem__(key))

    def items(self) -> ItemsView[str, Metric]:
        return cast("ItemsView[str, Metric]", super().items())

    def values(self) -> ValuesView[Metric]:
        return cast("ValuesView[Metric]", super().values())


class TestMetrics(nn.Module):
    """The ``trainer.test`` metrics of one dataloader: :attr:`logged` maps each name to log
    (``test_<name>``) to a torchmetrics ``Metric``; ``update`` adds one batch."""

    def __init__(self, sources: Mapping[str, Metric], logged: Mapping[str, Metric]) -> None:
        super().__init__()
        self.sources = _MetricDict(dict(sources))
        self.logged = _MetricDict(dict(logged))

    def count_batch(self) -> None:
        """Let every :class:`MetricValue` know that its source was updated."""
        for metric in self.logged.values():
            if isinstance(metric, MetricValue):
                metric.update()


def mixture_of_probabilities(probs: Tensor, entropy: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Summary of ``[J, B, ...]`` probabilities of ``J`` equal-weight components: their mean, its
    entropy, and (``J > 1``) the mutual information and the std over the components."""
    mean = probs.mean(dim=0)
    summary = {"mean": mean, "entropy": entropy(mean)}
    if probs.shape[0] > 1:
        summary["std"] = probs.std(dim=0, correction=0)
        summary["mutual_information"] = (summary["entropy"] - entropy(probs).mean(dim=0)).clamp_(min=0)
    return summary


def values_of(source: Metric, keys: Iterable[str]) -> dict[str, Metric]:
    """``{key: MetricValue(source, key)}`` for logging the dict-valued ``source``."""
    return {key: MetricValue(source, key) for key in keys}


class Likelihood(ABC):
    """What a task makes of the model's outputs (see the module docstring)."""

    task: ClassVar[str]
    accepts_pairs: ClassVar[bool] = False
    """Whether a ``(mean, variance)`` pair from ``output_transform`` is a valid output."""
    fits_noise: ClassVar[bool] = False
    """Whether ``fit_noise`` can fit a homoscedastic noise σ for it (the Gaussian regressions)."""
    needs_samples: ClassVar[bool] = False
    """Whether test metrics and held-out scores need the per-sample outputs (not only the summary)."""

    def check_outputs(self, outputs: Outputs) -> None:  # noqa: B027 - optional hook, nothing by default
        """Refuse or warn about outputs this likelihood cannot read correctly (at the first batch)."""

    @abstractmethod
    def summarize(self, chunks: Iterable[Outputs]) -> dict[str, Tensor]:
        """The BMA summary of the outputs of all weight samples, given chunk by chunk."""

    def sample_entries(self, outputs: Outputs) -> dict[str, Tensor]:
        """The per-sample entries of ``return_samples=True`` (``samples`` ``[S, B, ...]``)."""
        return {"samples": outputs} if isinstance(outputs, Tensor) else {"samples": outputs[0]}

    @abstractmethod
    def summarize_gaussian(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """The BMA summary when the outputs are an equal-weight mixture of ``J`` Gaussians
        ``N(mean[j], diag(variance[j]))`` (``mean``, ``variance``: ``[J, B, ...]``; ``J > 1`` for
        MultiSWAG), as the linearised predictive gives them, in closed form: the probit
        approximation of a softmax or sigmoid, the exact Gaussian of a regression."""

    @abstractmethod
    def test_metrics(self, summary: Mapping[str, Tensor]) -> TestMetrics:
        """New, empty ``trainer.test`` metrics for summaries like ``summary``."""

    @abstractmethod
    def update_test_metrics(self, metrics: TestMetrics, summary: Mapping[str, Tensor], targets: Any) -> None:
        """Add one batch: its summary (with per-sample entries when :attr:`needs_samples`) and targets."""

    @abstractmethod
    def held_out_score(
        self, summaries: list[dict[str, Tensor]], targets: list[Any]
    ) -> tuple[float, dict[str, Any]]:
        """The mean negative log-likelihood of held-out targets under the predictive, and the
        options the scoring fitted (e.g. ``{"noise": σ}``; empty when none)."""

    def describe(self) -> str:
        return self.task
