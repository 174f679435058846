"""Uncertainty metrics for classifiers: accuracy, NLL, Brier, ECE, entropy, mutual information, OOD AUROC.

Inputs are class **probabilities** ``[N, C]`` (for SWAG: already averaged over the Bayesian model
averaging samples) and integer targets ``[N]``. Logarithms are natural (entropies in nats).
Torchmetrics computes what it has (accuracy, calibration error, AUROC); the rest are one-liners
checked against explicit loops in the tests.

:class:`UncertaintyMetrics` accumulates the same numbers batch by batch (constant memory,
summable across processes) for a LightningModule's ``test_step``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_calibration_error,
)

EPS = 1e-12
"""Probabilities are clamped to at least this before taking logs."""
_ROW_SUM_TOLERANCE = 1e-2  # catches logits passed as probabilities, not rounding


def _check_probs_and_targets(probs: Tensor, targets: Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C]; got shape {tuple(probs.shape)}.")
    if targets.ndim != 1 or targets.shape[0] != probs.shape[0]:
        raise ValueError(
            f"targets must have shape [N] matching probs [N, C]; got targets {tuple(targets.shape)} "
            f"and probs {tuple(probs.shape)}."
        )
    if probs.shape[0] == 0:
        raise ValueError("probs and targets are empty (N = 0).")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer class indices; got dtype {targets.dtype}.")
    _check_probs(probs)
    if int(targets.min()) < 0 or int(targets.max()) >= probs.shape[1]:
        raise ValueError(
            f"targets must lie in [0, {probs.shape[1] - 1}] (C = {probs.shape[1]}); "
            f"got values in [{int(targets.min())}, {int(targets.max())}]."
        )


def _check_probs(probs: Tensor) -> None:
    """Reject inputs that are not probability vectors (typically logits passed by mistake)."""
    if probs.numel() == 0:
        return
    row_sums = probs.sum(dim=-1, dtype=torch.float32)
    if bool(probs.min() < 0) or bool((row_sums - 1).abs().max() > _ROW_SUM_TOLERANCE):
        raise ValueError(
            "probs must be probabilities (non-negative, each row summing to 1); got values in "
            f"[{float(probs.min()):.3g}, {float(probs.max()):.3g}] and row sums in "
            f"[{float(row_sums.min()):.3g}, {float(row_sums.max()):.3g}]. Apply softmax to logits first."
        )


def accuracy(probs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of samples whose most probable class is the target (a 0-d tensor)."""
    _check_probs_and_targets(probs, targets)
    return multiclass_accuracy(probs, targets, num_classes=probs.shape[1], average="micro")


def nll(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of the targets, ``-mean(log p[target])`` (p clamped at ``EPS``)."""
    _check_probs_and_targets(probs, targets)
    target_probs = probs.float().gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return -target_probs.clamp_min(EPS).log().mean()


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean over samples of ``sum_c (p_c - onehot_c)^2``; 0 is perfect, 2 the worst."""
    _check_probs_and_targets(probs, targets)
    one_hot = F.one_hot(targets.long(), num_classes=probs.shape[1]).float()
    return (probs.float() - one_hot).pow(2).sum(dim=1).mean()


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error (L1) of the top-1 confidence, over ``n_bins`` equal-width bins.

    ``sum_b (n_b / N) |accuracy_b - confidence_b|``, as torchmetrics computes it (bins are
    ``[k/n_bins, (k+1)/n_bins)``, and a confidence of exactly 1.0 gets a bin of its own).
    """
    _check_probs_and_targets(probs, targets)
    return multiclass_calibration_error(
        probs.float(), targets, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
    )


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` of each row of ``probs`` [N, C] (nats), shape [N]."""
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C]; got shape {tuple(probs.shape)}.")
    _check_probs(probs)
    probs = probs.float()
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def mutual_information(sample_probs: Tensor) -> Tensor:
    """Epistemic uncertainty per input: entropy of the mean minus mean entropy of the samples.

    Args:
        sample_probs: probabilities of ``S`` posterior samples, shape ``[S, N, C]``.

    Returns:
        ``[N]``, clamped at 0 (it is >= 0 mathematically; rounding can dip below). Zero when all
        samples agree.
    """
    if sample_probs.ndim != 3:
        raise ValueError(f"sample_probs must have shape [S, N, C]; got shape {tuple(sample_probs.shape)}.")
    _check_probs(sample_probs)
    sample_probs = sample_probs.float()
    entropy_of_mean = predictive_entropy(sample_probs.mean(dim=0))
    per_sample_entropy = -torch.special.xlogy(sample_probs, sample_probs).sum(dim=-1)
    return (entropy_of_mean - per_sample_entropy.mean(dim=0)).clamp_min(0.0)


def ood_auroc(in_scores: Tensor, out_scores: Tensor) -> Tensor:
    """AUROC of telling out-of-distribution inputs (positives) from in-distribution ones by a score.

    Args:
        in_scores: scores of in-distribution inputs, shape [N_in]; higher means "more OOD"
            (e.g. :func:`predictive_entropy`).
        out_scores: scores of out-of-distribution inputs, shape [N_out].

    Returns:
        0-d tensor: 1.0 when every OOD score exceeds every in-distribution score, 0.5 for chance.
    """
    if in_scores.ndim != 1 or out_scores.ndim != 1:
        raise ValueError(
            f"in_scores and out_scores must be 1-D; got shapes {tuple(in_scores.shape)} and "
            f"{tuple(out_scores.shape)}."
        )
    if in_scores.numel() == 0 or out_scores.numel() == 0:
        raise ValueError(
            f"Need at least one score on each side; got {in_scores.numel()} in and {out_scores.numel()} out."
        )
    scores = torch.cat([in_scores, out_scores.to(in_scores.device)]).double()
    labels = torch.cat(
        [
            torch.zeros(in_scores.numel(), dtype=torch.long, device=in_scores.device),
            torch.ones(out_scores.numel(), dtype=torch.long, device=in_scores.device),
        ]
    )
    # AUROC depends only on the order of the scores. torchmetrics squashes scores outside [0, 1]
    # with a sigmoid, which maps large scores to the same float (false ties); ranks scaled to
    # [0, 1] keep the order (and the ties) exactly.
    unique_scores, ranks = torch.unique(scores, sorted=True, return_inverse=True)
    scaled_ranks = ranks.double() / max(unique_scores.numel() - 1, 1)
    return binary_auroc(scaled_ranks, labels).float()


class ReliabilityCurve(NamedTuple):
    """Per-bin statistics of the top-1 confidence, for reliability diagrams.

    Empty bins have ``count == 0`` and NaN ``confidence``/``accuracy`` (matplotlib skips NaNs).
    """

    bin_edges: Tensor
    """``[n_bins + 1]`` edges from 0 to 1."""
    confidence: Tensor
    """``[n_bins]`` mean top-1 probability in each bin."""
    accuracy: Tensor
    """``[n_bins]`` fraction correct in each bin."""
    count: Tensor
    """``[n_bins]`` number of samples in each bin (int64)."""


def reliability_curve(probs: Tensor, targets: Tensor, n_bins: int = 15) -> ReliabilityCurve:
    """Bin samples by top-1 confidence into ``n_bins`` equal-width bins; mean confidence/accuracy per bin.

    Bins are ``[k/n_bins, (k+1)/n_bins)``, the last one closed at 1.0 (the usual reliability
    diagram). A perfectly calibrated model has ``accuracy == confidence`` in every bin.
    """
    _check_probs_and_targets(probs, targets)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    confidences, predictions = probs.float().max(dim=1)
    correct = (predictions == targets).float()
    bins = (confidences * n_bins).long().clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, device=probs.device).index_add_(0, bins, torch.ones_like(confidences))
    confidence_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, bins, confidences)
    correct_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, bins, correct)
    return ReliabilityCurve(
        bin_edges=torch.linspace(0, 1, n_bins + 1, device=probs.device),
        confidence=confidence_sum / count,
        accuracy=correct_sum / count,
        count=count.long(),
    )


def classification_metrics(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, Brier score, ECE and mean predictive entropy, as plain floats.

    Keys: ``accuracy``, ``nll``, ``brier``, ``ece``, ``entropy``.
    """
    _check_probs_and_targets(probs, targets)
    return {
        "accuracy": float(accuracy(probs, targets)),
        "nll": float(nll(probs, targets)),
        "brier": float(brier_score(probs, targets)),
        "ece": float(expected_calibration_error(probs, targets, n_bins=n_bins)),
        "entropy": float(predictive_entropy(probs).mean()),
    }


class UncertaintyMetrics(Metric):
    """Accumulates :func:`classification_metrics` over batches; ``compute()`` returns the same dict.

    Keeps only running sums (plus ``n_bins + 1`` calibration bins), so memory does not grow with the
    data set and states sum across processes. The ECE uses torchmetrics' binning, so it equals
    :func:`expected_calibration_error` on the concatenated data.

    Usage in a LightningModule::

        self.test_metrics = UncertaintyMetrics(num_classes=10)   # in __init__
        self.test_metrics.update(probs, targets)                  # in test_step
        self.log_dict({f"test_{k}": v for k, v in self.test_metrics.compute().items()})
        self.test_metrics.reset()                                 # in on_test_epoch_end

    Args:
        num_classes: number of classes ``C``; ``update`` checks probs have ``C`` columns.
        n_bins: calibration bins of the ECE.
        validate_args: check shapes, target range and that probs are probabilities at each
            ``update`` (a few host-device syncs per batch; turn off in hot loops once it works).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    correct: Tensor
    nll_sum: Tensor
    brier_sum: Tensor
    entropy_sum: Tensor
    count: Tensor
    bin_count: Tensor
    bin_confidence_sum: Tensor
    bin_correct_sum: Tensor

    def __init__(self, num_classes: int, n_bins: int = 15, validate_args: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.validate_args = validate_args
        # Counts are int64 (exact at any size); sums are float32 (float64 is unsupported on MPS).
        for name in ("correct", "count"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("nll_sum", "brier_sum", "entropy_sum"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")
        # Same bucketing as torchmetrics' calibration error: n_bins + 1 slots, the last for conf == 1.
        self.add_state("bin_count", default=torch.zeros(n_bins + 1, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("bin_confidence_sum", "bin_correct_sum"):
            self.add_state(name, default=torch.zeros(n_bins + 1), dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch of probabilities ``[B, C]`` and targets ``[B]``."""
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"probs must have shape [B, {self.num_classes}]; got shape {tuple(probs.shape)}."
            )
        if self.validate_args:
            _check_probs_and_targets(probs, targets)
        probs = probs.float()
        targets = targets.long()
        confidences, predictions = probs.max(dim=1)
        correct = predictions == targets
        target_probs = probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        one_hot = F.one_hot(targets, num_classes=self.num_classes).float()

        self.correct += correct.sum()
        self.nll_sum += -target_probs.clamp_min(EPS).log().sum()
        self.brier_sum += (probs - one_hot).pow(2).sum(dim=1).sum()
        self.entropy_sum += -torch.special.xlogy(probs, probs).sum(dim=1).sum()
        self.count += probs.shape[0]

        boundaries = torch.linspace(0, 1, self.n_bins + 1, dtype=confidences.dtype, device=confidences.device)
        bins = torch.bucketize(confidences, boundaries, right=True) - 1
        self.bin_count.index_add_(0, bins, torch.ones_like(bins))
        self.bin_confidence_sum.index_add_(0, bins, confidences)
        self.bin_correct_sum.index_add_(0, bins, correct.float())

    def compute(self) -> dict[str, Tensor]:
        """``accuracy``, ``nll``, ``brier``, ``ece``, ``entropy`` (mean predictive entropy): 0-d tensors."""
        if self.count == 0:
            raise ValueError("UncertaintyMetrics.compute() called before any update().")
        total = self.count.float()
        ece = (self.bin_correct_sum - self.bin_confidence_sum).abs().sum() / total
        return {
            "accuracy": self.correct / total,
            "nll": self.nll_sum / total,
            "brier": self.brier_sum / total,
            "ece": ece,
            "entropy": self.entropy_sum / total,
        }
