"""Uncertainty metrics for classifiers (accuracy, NLL, Brier, ECE, entropy, mutual information, OOD
AUROC) and for regression with a Gaussian noise model (mixture NLL, RMSE, interval coverage,
calibration error, CRPS), and the temperature-scaling baseline (:func:`fit_temperature`).

Classification inputs are class **probabilities** ``[N, C]`` (for SWAG: already averaged over the Bayesian model
averaging samples) and integer targets ``[N]``. Logarithms are natural (entropies in nats).
Torchmetrics computes what it has (accuracy, calibration error, AUROC); the rest are one-liners
checked against explicit loops in the tests.

:class:`UncertaintyMetrics` accumulates the same numbers batch by batch (constant memory,
summable across processes) for a LightningModule's ``test_step``; :class:`RegressionUncertaintyMetrics`
does the same for the regression metrics (see the "regression" section below).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_calibration_error,
)
from torchmetrics.functional.regression import mean_squared_error

EPS = 1e-12
"""Probabilities are clamped to at least this before taking logs."""
_ROW_SUM_TOLERANCE = 1e-2  # catches logits passed as probabilities, not rounding


def _check_probs_and_targets(probs: Tensor, targets: Tensor) -> None:
    _check_targets(probs, targets, "probs")
    _check_probs(probs)


def _check_targets(scores: Tensor, targets: Tensor, name: str) -> None:
    """``scores`` ``[N, C]`` (probabilities or logits, called ``name``) and integer ``targets``
    ``[N]`` in ``[0, C)``."""
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C]; got shape {tuple(scores.shape)}.")
    if targets.ndim != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets must have shape [N] matching {name} [N, C]; got targets {tuple(targets.shape)} "
            f"and {name} {tuple(scores.shape)}."
        )
    if scores.shape[0] == 0:
        raise ValueError(f"{name} and targets are empty (N = 0).")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer class indices; got dtype {targets.dtype}.")
    if int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]:
        raise ValueError(
            f"targets must lie in [0, {scores.shape[1] - 1}] (C = {scores.shape[1]}); "
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
    # the field shadows tuple.count (a method); the public name stays
    count: Tensor  # type: ignore[assignment]
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


class BernoulliUncertaintyMetrics(Metric):
    """Accumulates the metrics of independent binary decisions over batches (``task="binary"`` and
    ``task="multilabel"``): probabilities of the positive outcome and 0/1 targets of the same shape,
    every element one decision (multi-label metrics are pooled over labels, torchmetrics' ``"micro"``).

    ``compute()`` returns ``accuracy`` (threshold 0.5, as torchmetrics' ``binary_accuracy``),
    ``nll`` (mean Bernoulli negative log-likelihood, probabilities clamped at ``EPS``), ``brier``
    (mean ``(p − y)²``), ``ece`` (torchmetrics' ``binary_calibration_error`` binning: ``n_bins``
    equal-width bins of ``p``, L1 gap between the mean ``p`` and the fraction of positives) and
    ``entropy`` (mean Bernoulli entropy). Running sums only; states sum across processes.

    Args:
        n_bins: calibration bins of the ECE.
        validate_args: check that targets are 0/1 and probabilities in [0, 1] at each ``update``.
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
    bin_positive_sum: Tensor

    def __init__(self, n_bins: int = 15, validate_args: bool = True) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
        self.n_bins = n_bins
        self.validate_args = validate_args
        for name in ("correct", "count"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("nll_sum", "brier_sum", "entropy_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_count", default=torch.zeros(n_bins + 1, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("bin_confidence_sum", "bin_positive_sum"):
            self.add_state(name, default=torch.zeros(n_bins + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add probabilities and 0/1 targets of the same number of elements (flattened)."""
        p = probs.reshape(-1).double()
        y = targets.reshape(-1).to(p.device)
        if p.numel() != y.numel():
            raise ValueError(
                f"targets must hold one 0/1 value per probability: probs {tuple(probs.shape)}, targets "
                f"{tuple(targets.shape)}."
            )
        if self.validate_args and p.numel():
            if bool(((y != 0) & (y != 1)).any()):
                raise ValueError("Binary / multi-label targets must be 0 or 1.")
            if bool((p < 0).any() | (p > 1).any()):
                raise ValueError("probs must lie in [0, 1] (probabilities, not logits).")
        y = y.double()
        self.correct += ((p >= 0.5).double() == y).sum()
        self.nll_sum += -(y * p.clamp_min(EPS).log() + (1 - y) * (1 - p).clamp_min(EPS).log()).sum()
        self.brier_sum += (p - y).square().sum()
        self.entropy_sum += -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)).sum()
        self.count += p.numel()
        boundaries = torch.linspace(0, 1, self.n_bins + 1, dtype=p.dtype, device=p.device)
        bins = torch.bucketize(p, boundaries, right=True) - 1
        self.bin_count.index_add_(0, bins, torch.ones_like(bins))
        self.bin_confidence_sum.index_add_(0, bins, p)
        self.bin_positive_sum.index_add_(0, bins, y)

    def compute(self) -> dict[str, Tensor]:
        """``accuracy``, ``nll``, ``brier``, ``ece``, ``entropy``: 0-d tensors."""
        if self.count == 0:
            raise ValueError("BernoulliUncertaintyMetrics.compute() called before any update().")
        total = self.count.double()
        return {
            "accuracy": (self.correct / total).float(),
            "nll": (self.nll_sum / total).float(),
            "brier": (self.brier_sum / total).float(),
            "ece": ((self.bin_positive_sum - self.bin_confidence_sum).abs().sum() / total).float(),
            "entropy": (self.entropy_sum / total).float(),
        }


# ==================================================================================== regression
# Every regression metric below scores the predictive distribution of Bayesian model averaging
# with a Gaussian noise model: the equal-weight mixture (1/S) Σ_s N(means[s], variances[s]) over S
# weight samples. ``means`` is ``[S, N, ...]`` (sample axis first; one Gaussian per point is
# ``means.unsqueeze(0)``), ``variances`` broadcasts to it (a float σ² for homoscedastic noise) and
# ``targets`` has one value per point (any shape with ``N·…`` elements).

DEFAULT_COVERAGE_LEVELS: tuple[float, ...] = (0.5, 0.9, 0.95)
"""Central-interval probabilities whose coverage :func:`regression_metrics` reports."""
DEFAULT_CALIBRATION_LEVELS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""Quantile levels 0.05, 0.10, …, 0.95 of the regression calibration error and curve."""
_CRPS_CHUNK_ELEMENTS = 2**22  # bounds the [S, S, chunk] pairwise tensor of the CRPS
_SQRT2 = math.sqrt(2.0)


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for accuracy in the tails of the CDF; float32 where float64 is unsupported (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@overload
def _mixture_inputs(
    means: Tensor, variances: Tensor | float, targets: Tensor, validate: bool = True
) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def _mixture_inputs(
    means: Tensor, variances: Tensor | float, targets: None = None, validate: bool = True
) -> tuple[Tensor, Tensor, None]: ...
def _mixture_inputs(
    means: Tensor, variances: Tensor | float, targets: Tensor | None = None, validate: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Flatten to ``means [S, N]``, ``variances [S, N]`` and ``targets [N]`` in the working dtype."""
    if not isinstance(means, Tensor) or means.ndim < 2:
        shape = tuple(means.shape) if isinstance(means, Tensor) else type(means).__name__
        raise ValueError(
            f"means must have shape [S, N, ...] with the weight samples first; got {shape}. "
            "For a single Gaussian per point pass means.unsqueeze(0)."
        )
    dtype = _work_dtype(means.device)
    num_samples = means.shape[0]
    variances = torch.as_tensor(variances, device=means.device)
    try:
        variances = torch.broadcast_to(variances, means.shape)
    except RuntimeError as err:
        raise ValueError(
            f"variances of shape {tuple(variances.shape)} do not broadcast to means {tuple(means.shape)}."
        ) from err
    m = means.to(dtype).reshape(num_samples, -1)
    v = variances.to(dtype).reshape(num_samples, -1)
    if validate and bool((v < 0).any() | ~torch.isfinite(v).all()):
        raise ValueError(
            f"variances must be finite and >= 0; got values in [{float(v.min()):.3g}, {float(v.max()):.3g}]."
        )
    y = None
    if targets is not None:
        if targets.numel() != m.shape[1]:
            raise ValueError(
                f"targets must hold one value per point: {m.shape[1]} (means {tuple(means.shape)} without "
                f"the sample axis), got shape {tuple(targets.shape)}."
            )
        y = targets.to(device=means.device, dtype=dtype).reshape(-1)
    return m, v, y


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.special.erfc(-z / _SQRT2)


def _mixture_cdf(m: Tensor, v: Tensor, values: Tensor) -> Tensor:
    """Mixture CDF at ``values [..., N]`` for components ``m, v [S, N]``."""
    std = v.clamp_min(torch.finfo(v.dtype).tiny).sqrt()
    return _normal_cdf((values.unsqueeze(-2) - m) / std).mean(dim=-2)


def _mixture_log_prob(m: Tensor, v: Tensor, y: Tensor) -> Tensor:
    v = v.clamp_min(torch.finfo(v.dtype).tiny)
    component = -0.5 * (math.log(2 * math.pi) + v.log() + (y - m).square() / v)
    return torch.logsumexp(component, dim=0) - math.log(m.shape[0])


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")


def gaussian_mixture_nll(
    means: Tensor, variances: Tensor | float, targets: Tensor, reduction: str = "mean"
) -> Tensor:
    """Negative log density of ``targets`` under the mixture ``(1/S) Σ_s N(means[s], variances[s])``.

    Computed as ``log S − logsumexp_s log N(y; μ_s, σ²_s)``, stable for far-away targets and tiny
    variances (clamped at the smallest positive float). Returns the mean over points
    (``reduction="mean"``, a 0-d tensor) or ``[N]`` values (``"none"``), in nats.
    """
    m, v, y = _mixture_inputs(means, variances, targets)
    return _reduce(-_mixture_log_prob(m, v, y), reduction)


def gaussian_mixture_cdf(means: Tensor, variances: Tensor | float, values: Tensor) -> Tensor:
    """Mixture CDF ``(1/S) Σ_s Φ((value − μ_s) / σ_s)`` at one value per point, shape ``[N]``.

    At the targets this is the probability integral transform (PIT): uniform on [0, 1] for a
    calibrated predictive.
    """
    m, v, y = _mixture_inputs(means, variances, values)
    return _mixture_cdf(m, v, y)


def gaussian_mixture_quantile(
    means: Tensor, variances: Tensor | float, levels: Tensor | Sequence[float] | float, iterations: int = 64
) -> Tensor:
    """Quantiles of the mixture at every point, by bisection on the mixture CDF (all points at once).

    The ``q``-quantile lies between the smallest and the largest component ``q``-quantile (the
    mixture CDF is ≤ q at the former and ≥ q at the latter), and each of ``iterations`` steps halves
    that bracket, so 64 steps reach the float64 resolution.

    Args:
        levels: quantile levels in (0, 1): a float gives ``[N]``, a sequence of ``Q`` levels ``[Q, N]``.

    Returns:
        The quantiles in the working dtype (float64 except on MPS).
    """
    m, v, _ = _mixture_inputs(means, variances)
    scalar = isinstance(levels, (int, float))
    q = torch.as_tensor(levels, dtype=m.dtype, device=m.device).reshape(-1)
    if q.numel() == 0 or bool(((q <= 0) | (q >= 1)).any()):
        raise ValueError(f"quantile levels must lie in (0, 1), got {q.tolist()}.")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    z = _SQRT2 * torch.special.erfinv(2 * q - 1)  # standard normal quantiles [Q]
    component = m + v.sqrt() * z[:, None, None]  # [Q, S, N]
    low, high = component.amin(dim=1), component.amax(dim=1)
    target = q[:, None]
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        below = _mixture_cdf(m, v, middle) < target
        low = torch.where(below, middle, low)
        high = torch.where(below, high, middle)
    result = 0.5 * (low + high)
    return result[0] if scalar else result


def _check_level(level: float, what: str) -> None:
    if not 0 < level < 1:
        raise ValueError(f"{what} must lie in (0, 1), got {level!r}.")


def interval_coverage(
    means: Tensor, variances: Tensor | float, targets: Tensor, level: float = 0.9
) -> Tensor:
    """Fraction of targets inside the central ``level`` interval of their predictive mixture.

    The central interval is ``[Q((1 − level)/2), Q((1 + level)/2)]``; a target lies in it exactly
    when its PIT value lies in ``[(1 − level)/2, (1 + level)/2]``, which is how it is computed
    (no quantiles needed). Calibrated intervals cover ``level`` of the targets.
    """
    _check_level(level, "level")
    m, v, y = _mixture_inputs(means, variances, targets)
    pit = _mixture_cdf(m, v, y)
    return ((pit - 0.5).abs() <= level / 2).to(m.dtype).mean()


def regression_calibration_curve(
    means: Tensor,
    variances: Tensor | float,
    targets: Tensor,
    levels: Sequence[float] = DEFAULT_CALIBRATION_LEVELS,
) -> tuple[Tensor, Tensor]:
    """Nominal quantile levels ``p`` and the observed fraction of targets at or below their ``p``-quantile.

    The calibration curve of Kuleshov et al. (2018, "Accurate uncertainties for deep learning
    using calibrated regression"): observed ``p̂ = mean_n 1[F_n(y_n) ≤ p]`` against ``p``; a
    calibrated predictive lies on the diagonal.

    Returns:
        ``(nominal [L], observed [L])``.
    """
    for level in levels:
        _check_level(level, "each calibration level")
    m, v, y = _mixture_inputs(means, variances, targets)
    pit = _mixture_cdf(m, v, y)
    nominal = torch.as_tensor(list(levels), dtype=m.dtype, device=m.device)
    observed = (pit[None, :] <= nominal[:, None]).to(m.dtype).mean(dim=1)
    return nominal, observed


def regression_calibration_error(
    means: Tensor,
    variances: Tensor | float,
    targets: Tensor,
    levels: Sequence[float] = DEFAULT_CALIBRATION_LEVELS,
) -> Tensor:
    """Mean absolute gap ``mean_p |p̂ − p|`` of :func:`regression_calibration_curve` over ``levels``.

    Kuleshov et al. (2018) define the calibration error as a weighted *sum of squared* gaps
    ``Σ_j w_j (p_j − p̂_j)²``; we report the mean *absolute* gap over the levels 0.05, …, 0.95
    instead, which reads in coverage units (0.03 = quantiles off by 3 points on average; 0 is
    perfect). A 0-d tensor.
    """
    nominal, observed = regression_calibration_curve(means, variances, targets, levels)
    return (observed - nominal).abs().mean()


def _crps_term(mu: Tensor, var: Tensor) -> Tensor:
    """``E|X|`` for ``X ~ N(mu, var)``: ``2σφ(mu/σ) + mu(2Φ(mu/σ) − 1)``, and ``|mu|`` when ``var = 0``."""
    std = var.sqrt()
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    z = mu / safe_std
    density = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    value = 2 * safe_std * density + mu * (2 * _normal_cdf(z) - 1)
    return torch.where(positive, value, mu.abs())


def gaussian_mixture_crps(
    means: Tensor, variances: Tensor | float, targets: Tensor, reduction: str = "mean"
) -> Tensor:
    """Continuous ranked probability score of the mixture, in closed form (lower is better).

    ``CRPS(F, y) = E|X − y| − ½ E|X − X'|`` with ``X, X'`` independent draws of the mixture, which
    for a Gaussian mixture is ``Σ_i w_i A(y − μ_i, σ²_i) − ½ Σ_ij w_i w_j A(μ_i − μ_j, σ²_i + σ²_j)``
    with ``A(μ, σ²) = E|N(μ, σ²)|`` (Grimit et al., 2006). With zero variances it is the ensemble
    CRPS of the sample means (torchmetrics' ``continuous_ranked_probability_score``). Costs
    ``O(S²)`` per point, evaluated in chunks of points to bound memory.
    """
    m, v, y = _mixture_inputs(means, variances, targets)
    num_samples, num_points = m.shape
    chunk = max(1, _CRPS_CHUNK_ELEMENTS // (num_samples * num_samples))
    values = []
    for start in range(0, num_points, chunk):
        mc, vc, yc = m[:, start : start + chunk], v[:, start : start + chunk], y[start : start + chunk]
        to_target = _crps_term(yc - mc, vc).mean(dim=0)
        pairwise = _crps_term(mc[:, None] - mc[None, :], vc[:, None] + vc[None, :]).mean(dim=(0, 1))
        values.append(to_target - 0.5 * pairwise)
    return _reduce(torch.cat(values), reduction)


def rmse(predictions: Tensor, targets: Tensor) -> Tensor:
    """Root mean squared error of point predictions (e.g. the predictive mean), a 0-d tensor.

    ``targets`` may have any shape with as many elements as ``predictions``.
    """
    if predictions.numel() != targets.numel() or predictions.numel() == 0:
        raise ValueError(
            f"predictions and targets must have the same, non-zero number of elements; got shapes "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}."
        )
    dtype = _work_dtype(predictions.device)
    return mean_squared_error(
        predictions.to(dtype).reshape(-1), targets.to(predictions.device, dtype).reshape(-1), squared=False
    )


def _level_key(level: float) -> str:
    return f"coverage_{100 * level:g}"


def regression_metrics(
    means: Tensor,
    variances: Tensor | float,
    targets: Tensor,
    coverage_levels: Sequence[float] = DEFAULT_COVERAGE_LEVELS,
    calibration_levels: Sequence[float] = DEFAULT_CALIBRATION_LEVELS,
) -> dict[str, float]:
    """The mixture predictive's metrics as plain floats.

    Keys: ``nll`` (:func:`gaussian_mixture_nll`), ``rmse`` (of the mixture mean), ``crps``,
    ``calibration_error`` (:func:`regression_calibration_error`), ``mean_std`` (mean predictive
    std of the mixture) and ``coverage_50``, ``coverage_90``, ``coverage_95`` (one per
    ``coverage_levels``, :func:`interval_coverage`).
    """
    m, v, y = _mixture_inputs(means, variances, targets)
    epistemic_var, mixture_mean = torch.var_mean(m, dim=0, correction=0)
    result = {
        "nll": float(gaussian_mixture_nll(m, v, y)),
        "rmse": float(rmse(mixture_mean, y)),
        "crps": float(gaussian_mixture_crps(m, v, y)),
        "calibration_error": float(regression_calibration_error(m, v, y, calibration_levels)),
        "mean_std": float((epistemic_var + v.mean(dim=0)).sqrt().mean()),
    }
    for level in coverage_levels:
        result[_level_key(level)] = float(interval_coverage(m, v, y, level))
    return result


def fit_gaussian_noise(
    means: Tensor,
    targets: Tensor,
    variances: Tensor | None = None,
    grid_size: int = 64,
    tolerance: float = 1e-10,
) -> float:
    """Maximum-likelihood homoscedastic noise ``σ`` of the mixture ``(1/S) Σ_s N(means[s], variances[s] + σ²)``.

    Minimises :func:`gaussian_mixture_nll` over ``log σ``, deterministically. ``variances`` are the
    components' own (epistemic) variances, e.g. those of the linearised predictive; ``None`` for
    point components (weight samples). Without them, at every stationary point ``σ²`` is a
    responsibility-weighted average of the squared residuals ``r²_sn`` (for each point the weights
    over ``s`` sum to 1), so the minimum lies in ``[sqrt(mean_n min_s r²), sqrt(mean_n max_s r²)]``.
    With them, ``σ²`` is a positively weighted average of ``r²_sn − v_sn``, so it lies in
    ``[min (r² − v), max (r² − v)]`` (at least ``1e-8`` times the largest residual: the likelihood
    may grow as σ → 0 when the variances exceed the residuals). A ``grid_size``-point log-spaced grid
    over the bracket locates the minimum and golden-section search refines it to ``tolerance`` in
    ``log σ``. With one sample (``S = 1``) and no variances this is the root mean squared residual.

    Args:
        means: per-sample predictive means on held-out data, ``[S, N, ...]``.
        targets: the held-out targets (``N·…`` elements).
        variances: the components' variances, broadcastable to ``means`` (``>= 0``), or ``None``.

    Returns:
        σ as a float.
    """
    if grid_size < 3:
        raise ValueError(f"grid_size must be >= 3, got {grid_size}.")
    m, v, y = _mixture_inputs(means, 0.0 if variances is None else variances, targets)
    squared = (y - m).square()
    if variances is None:
        upper = float(squared.amax(dim=0).mean().sqrt())
        lower = float(squared.amin(dim=0).mean().sqrt())
    else:
        excess = squared - v
        upper = math.sqrt(max(float(excess.max()), 0.0))
        lower = math.sqrt(max(float(excess.min()), 0.0))
        if math.isfinite(upper) and upper == 0:  # the variances explain every residual: σ at the floor
            upper = float(squared.max().sqrt())
            lower = upper * 1e-8
    if not math.isfinite(upper):
        raise ValueError("means or targets hold NaN or infinite values.")
    if upper == 0:
        raise ValueError("Every sample predicts every target exactly; the maximum-likelihood noise is 0.")
    if lower == upper:
        return upper
    lower = max(lower, upper * 1e-8)  # the likelihood is unbounded only if residuals vanish

    def objective(log_sigma: float) -> float:
        return float(-_mixture_log_prob(m, v + math.exp(2 * log_sigma), y).mean())

    return math.exp(_grid_then_golden(objective, math.log(lower), math.log(upper), grid_size, tolerance))


def fit_temperature(
    logits: Tensor,
    targets: Tensor,
    bounds: tuple[float, float] = (0.05, 20.0),
    grid_size: int = 64,
    tolerance: float = 1e-10,
) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on held-out data (Guo et
    al. 2017's temperature scaling).

    The NLL is convex in ``1 / T``, hence unimodal in ``log T``: a ``grid_size``-point log-spaced
    grid over ``bounds`` locates the minimum and golden-section search refines it to ``tolerance``
    in ``log T``, deterministically. A minimum on the edge of ``bounds`` is returned with a warning
    (widen them; on data the model classifies perfectly the NLL keeps falling as ``T → 0``).

    Args:
        logits: held-out logits ``[N, C]``.
        targets: their integer classes ``[N]``.
        bounds: the range searched, ``0 < low < high``.

    Returns:
        ``T`` as a float (``> 1`` softens an over-confident model).
    """
    low, high = bounds
    if not 0 < low < high or not math.isfinite(high):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}.")
    if grid_size < 3:
        raise ValueError(f"grid_size must be >= 3, got {grid_size}.")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [N, C]; got {logits.dtype} {tuple(logits.shape)}.")
    _check_targets(logits, targets, "logits")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold NaN or infinite values.")
    logits, targets = logits.double(), targets.long()

    def objective(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), targets))

    log_low, log_high = math.log(low), math.log(high)
    best = _grid_then_golden(objective, log_low, log_high, grid_size, tolerance)
    if min(best - log_low, log_high - best) <= 2 * tolerance:
        warnings.warn(
            f"fit_temperature: the NLL is lowest at the edge of bounds={bounds} (T = {math.exp(best):.4g}); "
            "widen the bounds.",
            stacklevel=2,
        )
    return math.exp(best)


def _grid_then_golden(
    objective: Callable[[float], float], low: float, high: float, grid_size: int, tolerance: float
) -> float:
    """The minimiser of ``objective`` on ``[low, high]``: the best of a ``grid_size``-point grid, then
    golden-section search between its neighbours down to ``tolerance``."""
    grid = torch.linspace(low, high, grid_size, dtype=torch.float64).tolist()
    values = [objective(t) for t in grid]
    best = min(range(grid_size), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, grid_size - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = objective(c), objective(d)
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = objective(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = objective(d)
    return 0.5 * (a + b)


class RegressionUncertaintyMetrics(Metric):
    """Accumulates :func:`regression_metrics` over batches; ``compute()`` returns the same keys.

    Keeps running sums and, per coverage and calibration level, a count of targets, so memory does
    not grow with the data set and states sum across processes. Every value equals the function
    on the concatenated data.

    Usage in a LightningModule::

        self.test_metrics = RegressionUncertaintyMetrics()         # in __init__
        self.test_metrics.update(sample_means, variances, targets)  # in test_step, means [S, B, ...]
        self.log_dict({f"test_{k}": v for k, v in self.test_metrics.compute().items()})
        self.test_metrics.reset()                                   # in on_test_epoch_end

    Args:
        coverage_levels: central-interval probabilities whose coverage is reported.
        calibration_levels: quantile levels of the calibration error.
        validate_args: check shapes and that variances are finite and >= 0 at each ``update``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    nll_sum: Tensor
    squared_error_sum: Tensor
    crps_sum: Tensor
    std_sum: Tensor
    count: Tensor
    coverage_count: Tensor
    calibration_count: Tensor

    def __init__(
        self,
        coverage_levels: Sequence[float] = DEFAULT_COVERAGE_LEVELS,
        calibration_levels: Sequence[float] = DEFAULT_CALIBRATION_LEVELS,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        for level in coverage_levels:
            _check_level(level, "each coverage level")
        for level in calibration_levels:
            _check_level(level, "each calibration level")
        if not calibration_levels:
            raise ValueError("calibration_levels must not be empty.")
        self.coverage_levels = tuple(float(level) for level in coverage_levels)
        self.calibration_levels = tuple(float(level) for level in calibration_levels)
        self.validate_args = validate_args
        # Counts are int64 (exact); sums are float32 (float64 is unsupported on MPS).
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("nll_sum", "squared_error_sum", "crps_sum", "std_sum"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state(
            "coverage_count",
            default=torch.zeros(len(self.coverage_levels), dtype=torch.int64),
            dist_reduce_fx="sum",
        )
        self.add_state(
            "calibration_count",
            default=torch.zeros(len(self.calibration_levels), dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, means: Tensor, variances: Tensor | float, targets: Tensor) -> None:
        """Add a batch: per-sample means ``[S, B, ...]``, variances broadcastable to them, targets."""
        m, v, y = _mixture_inputs(means, variances, targets, validate=self.validate_args)
        epistemic_var, mixture_mean = torch.var_mean(m, dim=0, correction=0)
        pit = _mixture_cdf(m, v, y)
        coverage = torch.as_tensor(self.coverage_levels, dtype=m.dtype, device=m.device)
        calibration = torch.as_tensor(self.calibration_levels, dtype=m.dtype, device=m.device)
        self.nll_sum += -_mixture_log_prob(m, v, y).sum().float()
        self.squared_error_sum += (mixture_mean - y).square().sum().float()
        self.crps_sum += gaussian_mixture_crps(m, v, y, reduction="none").sum().float()
        self.std_sum += (epistemic_var + v.mean(dim=0)).sqrt().sum().float()
        self.count += y.numel()
        self.coverage_count += ((pit - 0.5).abs()[None, :] <= coverage[:, None] / 2).sum(dim=1)
        self.calibration_count += (pit[None, :] <= calibration[:, None]).sum(dim=1)

    def compute(self) -> dict[str, Tensor]:
        """``nll``, ``rmse``, ``crps``, ``calibration_error``, ``mean_std``, ``coverage_<level>``: 0-d tensors."""
        if self.count == 0:
            raise ValueError("RegressionUncertaintyMetrics.compute() called before any update().")
        total = self.count.float()
        nominal = torch.as_tensor(self.calibration_levels, device=total.device)
        observed = self.calibration_count.float() / total
        result = {
            "nll": self.nll_sum / total,
            "rmse": (self.squared_error_sum / total).sqrt(),
            "crps": self.crps_sum / total,
            "calibration_error": (observed - nominal).abs().mean(),
            "mean_std": self.std_sum / total,
        }
        for level, count in zip(self.coverage_levels, self.coverage_count, strict=True):
            result[_level_key(level)] = count.float() / total
        return result
