"""The categorical likelihood (``task="classification"``): a softmax over the class dimension.

Outputs are logits ``[B, C]``, or dense ones with more dimensions, where ``class_dim`` says which
holds the classes: ``1`` for segmentation ``[B, C, H, W]`` (as ``cross_entropy``), ``-1`` for tokens
``[B, T, C]``. A dense output without ``class_dim`` is an error, never a guess. Dense test metrics
are computed per element, skipping targets equal to ``ignore_index``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_swag.checks import check_class_dim
from lightning_swag.likelihoods.likelihood import (
    Likelihood,
    Outputs,
    TestMetrics,
    mixture_of_probabilities,
    values_of,
)
from lightning_swag.likelihoods.summaries import (
    categorical_entropy,
    probability_summary,
    softmax_with_entropy,
    summary_dtype,
)
from lightning_swag.metrics import EPS, UncertaintyMetrics

__all__ = ["Categorical"]

_PROBABILITY_TOLERANCE = 1e-4
_TEST_KEYS = ("accuracy", "nll", "brier", "ece", "entropy")


class Categorical(Likelihood):
    """Softmax over the class dimension (see the module docstring).

    Args:
        class_dim: the class dimension of outputs with more than two dimensions (``1`` or ``-1``,
            counted in the model's output ``[B, ...]``); ``None`` for ``[B, C]`` outputs.
        ignore_index: dense targets equal to this are left out of the test metrics.
    """

    task = "classification"

    def __init__(self, class_dim: int | None = None, ignore_index: int = -100) -> None:
        self.class_dim = check_class_dim(class_dim)
        self.ignore_index = ignore_index
        self._warned = False

    def _axis(self, outputs: Tensor) -> int:
        """The class axis of stacked outputs ``[S, B, ...]`` (a negative index)."""
        per_sample = outputs.dim() - 1
        if per_sample < 2:
            raise ValueError(
                f"Classification outputs must be logits of shape [B, C] (or dense ones with class_dim), got "
                f"per-sample outputs of shape {tuple(outputs.shape[1:])}; for one logit per row use task='binary'."
            )
        if self.class_dim is None:
            if per_sample == 2:
                return -1
            raise ValueError(
                f"The model's outputs have shape {tuple(outputs.shape[1:])}, more than [B, C], so it is not clear "
                "which dimension holds the classes: pass SWAGModule(..., class_dim=1) for [B, C, H, W] "
                "(segmentation, as cross_entropy) or class_dim=-1 for [B, T, C] (tokens)."
            )
        if not -per_sample <= self.class_dim < per_sample:
            raise ValueError(
                f"class_dim={self.class_dim} is out of range for outputs of shape {tuple(outputs.shape[1:])}."
            )
        return self.class_dim - per_sample if self.class_dim > 0 else self.class_dim

    def check_outputs(self, outputs: Outputs) -> None:
        logits = outputs if isinstance(outputs, Tensor) else outputs[0]
        axis = self._axis(logits)
        first = logits[0].detach()
        sums = first.double().sum(dim=axis)
        looks_like_probs = bool((first >= 0).all()) and bool(
            ((sums - 1).abs() < _PROBABILITY_TOLERANCE).all()
        )
        if looks_like_probs and not self._warned:
            self._warned = True
            warnings.warn(
                "SWAGModule expects logits, but the model's outputs look like probabilities (non-negative and "
                "summing to one over the class dimension in every row): a softmax is applied to them again. "
                "Remove the model's final softmax, or pass output_transform=torch.log.",
                stacklevel=6,
            )

    def summarize(self, chunks: Iterable[Outputs]) -> dict[str, Tensor]:
        moved = (self._classes_last(logits) for logits in chunks)
        summary = probability_summary(moved, softmax_with_entropy, categorical_entropy)
        back = self._axis(summary["mean"].unsqueeze(0))  # the same class axis in a per-sample output [B, ...]
        return {k: v.movedim(-1, back) if k in ("mean", "std") else v for k, v in summary.items()}

    def _classes_last(self, logits: Outputs) -> Tensor:
        """Stacked logits ``[S, B, ...]`` with the class axis moved last."""
        assert isinstance(logits, Tensor)
        return logits.movedim(self._axis(logits), -1)

    def summarize_gaussian(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        axis = self._axis(mean)
        # The multi-class probit approximation (as laplace-torch): softmax(μ / √(1 + π/8 · σ²)).
        scaled = mean / (1 + math.pi / 8 * variance).sqrt()
        probs = torch.softmax(scaled.to(summary_dtype(mean)), dim=axis).movedim(axis, -1)
        summary = mixture_of_probabilities(probs, categorical_entropy)
        back = axis
        return {k: v.movedim(-1, back) if k in ("mean", "std") else v for k, v in summary.items()}

    def _flat(self, probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-element ``probs [N, C]``, ``targets [N]`` and the mask of the kept (not ignored) elements."""
        axis = self._axis(probs.unsqueeze(0))
        moved = probs.movedim(axis, -1)
        if targets.shape != moved.shape[:-1]:
            raise ValueError(
                f"Classification targets of shape {tuple(targets.shape)} do not match the class probabilities "
                f"{tuple(probs.shape)}: give one class index per {'row' if probs.dim() == 2 else 'element'} "
                f"(shape {tuple(moved.shape[:-1])}), with {self.ignore_index} (ignore_index) for padding."
            )
        flat_targets = targets.reshape(-1)
        keep = flat_targets != self.ignore_index
        return moved.reshape(-1, moved.shape[-1]), flat_targets, keep

    def test_metrics(self, summary: Mapping[str, Tensor]) -> TestMetrics:
        axis = self._axis(summary["mean"].unsqueeze(0))
        source = UncertaintyMetrics(num_classes=summary["mean"].shape[axis])
        logged = {**values_of(source, _TEST_KEYS)}
        if "mutual_information" in summary:
            logged["mutual_information"] = MeanMetric()
        return TestMetrics({"source": source}, logged)

    def update_test_metrics(self, metrics: TestMetrics, summary: Mapping[str, Tensor], targets: Any) -> None:
        probs, flat_targets, keep = self._flat(summary["mean"], targets)
        metrics.sources["source"].update(probs[keep], flat_targets[keep])
        if "mutual_information" in metrics.logged:
            metrics.logged["mutual_information"].update(summary["mutual_information"].reshape(-1)[keep])
        metrics.count_batch()

    def held_out_score(
        self, summaries: list[dict[str, Tensor]], targets: list[Any]
    ) -> tuple[float, dict[str, Any]]:
        total, count = 0.0, 0
        for summary, batch_targets in zip(summaries, targets, strict=True):
            probs, flat_targets, keep = self._flat(summary["mean"], batch_targets)
            picked = probs[keep].double().gather(1, flat_targets[keep].long().unsqueeze(1))
            total += float(-picked.clamp_min(EPS).log().sum())
            count += int(keep.sum())
        return total / max(count, 1), {}
