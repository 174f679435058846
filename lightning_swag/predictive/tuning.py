"""Choosing options on held-out data: the covariance scale and a homoscedastic noise level.

Both are functions of a predictive (any :class:`~lightning_swag.predictive.base.Predictive` and
its likelihood): ``SWAGModule.tune_scale`` and ``SWAGModule.fit_noise`` call them with the module's
own predictive and held-out batches. Choose on validation data, never on the test set.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_swag.checks import check_scale
from lightning_swag.likelihoods import Likelihood, regression_targets
from lightning_swag.metrics import fit_gaussian_noise

__all__ = ["fit_noise", "tune_scale"]

Batches = Sequence[tuple[Any, Any]]


def tune_scale(
    predict: Callable[[Any, float], dict[str, Tensor]],
    likelihood: Likelihood,
    batches: Batches,
    scales: Sequence[float],
) -> tuple[dict[float, float], float, dict[str, Any]]:
    """Score every candidate scale by the mean held-out negative log-likelihood of the predictive.

    Args:
        predict: ``predict(inputs, scale)``, the predictive's summary (with per-sample entries when
            the likelihood needs them), drawing the same noise for every candidate, so that the
            comparison is not blurred by sampling noise.
        likelihood: scores the summaries (:meth:`Likelihood.held_out_score`).
        batches: held-out ``(inputs, targets)``.
        scales: the candidates (each ``>= 0``).

    Returns:
        ``({scale: score}, best scale, the options fitted for the best scale)``; a warning says so
        when the best is at the edge of several candidates (the optimum may lie beyond).
    """
    if isinstance(scales, (int, float)) or not scales:
        raise ValueError(f"scales must be a non-empty sequence of finite numbers >= 0, got {scales!r}.")
    try:
        candidates = [check_scale(s) for s in scales]
    except ValueError as err:
        raise ValueError(
            f"scales must be a non-empty sequence of finite numbers >= 0, got {scales!r}."
        ) from err
    scores: dict[float, float] = {}
    fitted: dict[float, dict[str, Any]] = {}
    for scale in candidates:
        summaries = [predict(inputs, scale) for inputs, _ in batches]
        scores[scale], fitted[scale] = likelihood.held_out_score(summaries, [t for _, t in batches])
    best = min(scores, key=scores.__getitem__)
    at_edge = best == max(candidates) or (best == min(candidates) and best > 0)
    if len(set(candidates)) > 1 and at_edge:
        warnings.warn(
            f"SWAGModule.tune_scale: the best candidate, scale={best:g}, is at the edge of the candidates "
            f"{sorted(set(candidates))}; the optimum may lie beyond it, so widen the range.",
            stacklevel=4,
        )
    return scores, best, fitted[best]


def fit_noise(components: Callable[[Any], tuple[Tensor, Tensor | None]], batches: Batches) -> float:
    """The maximum-likelihood homoscedastic noise σ of the predictive mixture on held-out batches.

    Args:
        components: ``components(inputs)``: the means ``[S, B, ...]`` of the predictive's components
            (one per weight sample, or one Gaussian per posterior) and their own variances of the
            same shape (``None`` for weight samples); σ² is added to them.
        batches: held-out ``(inputs, targets)``.
    """
    parts = [components(inputs) for inputs, _ in batches]
    targets = [
        regression_targets(t, means[0]).reshape(-1) for (_, t), (means, _) in zip(batches, parts, strict=True)
    ]
    means = torch.cat([m.reshape(m.shape[0], -1) for m, _ in parts], dim=1)
    variances = None
    if parts[0][1] is not None:
        variances = torch.cat([v.reshape(v.shape[0], -1) for _, v in parts if v is not None], dim=1)
    sigma = fit_gaussian_noise(means, torch.cat(targets), variances)
    if not math.isfinite(sigma):
        raise ValueError("fit_noise: the held-out outputs or targets hold NaN or infinite values.")
    return sigma
