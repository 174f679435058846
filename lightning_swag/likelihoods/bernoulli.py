"""Bernoulli likelihoods: independent sigmoids, one per output element.

``task="binary"``: one logit per row (``[B]`` or ``[B, 1]``; dense binary outputs such as
``[B, 1, H, W]`` masks work the same way, element by element). ``task="multilabel"``: an
independent sigmoid per label, ``[B, L]``. Both summarise every element (mean probability of the
positive outcome, its std over the samples, the Bernoulli entropy of the mean, the mutual
information) and keep the output's shape. Targets are 0/1 of the output's shape (``[B]`` targets
are accepted for ``[B, 1]`` outputs); with ``ignore_index`` elements equal to it are skipped.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_swag.likelihoods.likelihood import (
    Likelihood,
    Outputs,
    TestMetrics,
    mixture_of_probabilities,
    values_of,
)
from lightning_swag.likelihoods.summaries import (
    bernoulli_entropy,
    probability_summary,
    sigmoid_with_entropy,
    summary_dtype,
)
from lightning_swag.metrics import EPS, BernoulliUncertaintyMetrics

__all__ = ["Binary", "IndependentSigmoids", "Multilabel"]

_TEST_KEYS = ("accuracy", "nll", "brier", "ece", "entropy")


class IndependentSigmoids(Likelihood):
    """Independent sigmoids (see the module docstring); the tasks differ only in the output shapes
    they accept (:meth:`check_outputs`).

    Args:
        ignore_index: targets equal to this are left out of the test metrics and held-out scores.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    @abstractmethod
    def check_outputs(self, outputs: Outputs) -> None:
        """Refuse outputs whose shape is not the task's."""

    def summarize(self, chunks: Iterable[Outputs]) -> dict[str, Tensor]:
        return probability_summary(chunks, sigmoid_with_entropy, bernoulli_entropy)  # type: ignore[arg-type]

    def summarize_gaussian(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        probs = torch.sigmoid((mean / (1 + math.pi / 8 * variance).sqrt()).to(summary_dtype(mean)))
        return mixture_of_probabilities(probs, bernoulli_entropy)

    def _flat(self, probs: Tensor, targets: Any) -> tuple[Tensor, Tensor]:
        """Probabilities and targets of the kept elements, flattened."""
        if (
            not isinstance(targets, Tensor)
            or targets.numel() != probs.numel()
            or targets.shape[:1] != probs.shape[:1]
        ):
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"{self.task} targets of shape {shape} do not match the outputs of shape {tuple(probs.shape)}: give "
                "one 0/1 target per output element."
            )
        flat_targets = targets.reshape(-1)
        keep = flat_targets != self.ignore_index
        return probs.reshape(-1)[keep], flat_targets[keep]

    def test_metrics(self, summary: Mapping[str, Tensor]) -> TestMetrics:
        source = BernoulliUncertaintyMetrics()
        logged = {**values_of(source, _TEST_KEYS)}
        if "mutual_information" in summary:
            logged["mutual_information"] = MeanMetric()
        return TestMetrics({"source": source}, logged)

    def update_test_metrics(self, metrics: TestMetrics, summary: Mapping[str, Tensor], targets: Any) -> None:
        probs, flat_targets = self._flat(summary["mean"], targets)
        metrics.sources["source"].update(probs, flat_targets)
        if "mutual_information" in metrics.logged:
            keep = targets.reshape(-1) != self.ignore_index
            metrics.logged["mutual_information"].update(summary["mutual_information"].reshape(-1)[keep])
        metrics.count_batch()

    def held_out_score(
        self, summaries: list[dict[str, Tensor]], targets: list[Any]
    ) -> tuple[float, dict[str, Any]]:
        total, count = 0.0, 0
        for summary, batch_targets in zip(summaries, targets, strict=True):
            p, y = self._flat(summary["mean"].double(), batch_targets)
            y = y.double()
            total += float(-(y * p.clamp_min(EPS).log() + (1 - y) * (1 - p).clamp_min(EPS).log()).sum())
            count += y.numel()
        return total / max(count, 1), {}


class Binary(IndependentSigmoids):
    """One sigmoid per output element: ``[B]`` or ``[B, 1]`` logits, or dense ones (masks)."""

    task = "binary"

    def check_outputs(self, outputs: Outputs) -> None:
        logits = outputs if isinstance(outputs, Tensor) else outputs[0]
        if logits.dim() < 2:
            raise ValueError(
                f"{self.task} outputs need a batch dimension; got stacked outputs {tuple(logits.shape)}."
            )


class Multilabel(IndependentSigmoids):
    """An independent sigmoid per label: outputs ``[B, L]`` with 0/1 targets ``[B, L]``."""

    task = "multilabel"

    def check_outputs(self, outputs: Outputs) -> None:
        logits = outputs if isinstance(outputs, Tensor) else outputs[0]
        if logits.dim() != 3:
            raise ValueError(
                f"Multi-label outputs must be logits of shape [B, L] (one per label), got {tuple(logits.shape[1:])}; "
                "for one logit per row use task='binary'."
            )
