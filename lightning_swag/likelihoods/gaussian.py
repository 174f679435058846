"""Regression likelihoods: the outputs are means, with or without a Gaussian noise model.

* :class:`Regression` (``noise=None``): the spread of the sampled outputs only (epistemic):
  ``mean``, ``std``; test metrics ``rmse`` and ``mean_std``.
* :class:`GaussianNoise` (``noise=σ``): homoscedastic noise. The predictive is the equal-weight
  mixture of ``N(mean_s, σ²)`` over the weight samples.
* :class:`Heteroscedastic` (``noise="heteroscedastic"``): the model predicts its own noise, its last
  output dimension holding ``(mean, log-variance)`` (or ``output_transform`` returns a
  ``(mean, variance)`` pair); the mixture of ``N(mean_s, variance_s)``.

With a noise model the summary has ``mean``, ``std`` (total), ``epistemic_std`` and
``aleatoric_std``, the test metrics are the mixture's (NLL, RMSE, CRPS, calibration error, coverage)
and ``tune_scale`` scores the mixture NLL.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric, MeanSquaredError

from lightning_swag.likelihoods.likelihood import Likelihood, Outputs, TestMetrics, values_of
from lightning_swag.likelihoods.summaries import (
    gaussian_mixture_summary,
    heteroscedastic_mean_variance,
    mixture_summary,
    moments_summary,
)
from lightning_swag.metrics import RegressionUncertaintyMetrics, fit_gaussian_noise, gaussian_mixture_nll

__all__ = ["GaussianNoise", "Heteroscedastic", "Regression", "regression_targets"]

_MIXTURE_TEST_KEYS = (
    "nll",
    "rmse",
    "crps",
    "calibration_error",
    "mean_std",
    "coverage_50",
    "coverage_90",
    "coverage_95",
)


def regression_targets(targets: Tensor, mean: Tensor) -> Tensor:
    """``targets`` shaped like the predictive ``mean`` (``[B]`` targets for ``[B, 1]`` outputs), or an
    error that names both shapes."""
    if targets.shape == mean.shape:
        return targets
    if targets.numel() == mean.numel() and targets.shape[0] == mean.shape[0] and mean.shape[1:].numel() == 1:
        return targets.reshape(mean.shape)
    raise ValueError(
        f"Regression targets of shape {tuple(targets.shape)} do not match the model's outputs of shape "
        f"{tuple(mean.shape)}: give one target per output (or override SWAGModule.batch_targets)."
    )


class Regression(Likelihood):
    """No noise model: the BMA mean and the spread of the sampled outputs."""

    task = "regression"
    fits_noise = True

    def summarize(self, chunks: Iterable[Outputs]) -> dict[str, Tensor]:
        return moments_summary(chunks)  # type: ignore[arg-type]

    def summarize_gaussian(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        spread, centre = mean.var(dim=0, correction=0), mean.mean(dim=0)
        return {"mean": centre, "std": (variance.mean(dim=0) + spread).sqrt()}

    def test_metrics(self, summary: Mapping[str, Tensor]) -> TestMetrics:
        return TestMetrics({}, {"rmse": MeanSquaredError(squared=False), "mean_std": MeanMetric()})

    def update_test_metrics(self, metrics: TestMetrics, summary: Mapping[str, Tensor], targets: Any) -> None:
        metrics.logged["rmse"].update(summary["mean"], regression_targets(targets, summary["mean"]))
        metrics.logged["mean_std"].update(summary["std"])

    def held_out_score(
        self, summaries: list[dict[str, Tensor]], targets: list[Any]
    ) -> tuple[float, dict[str, Any]]:
        raise ValueError(
            "tune_scale needs a likelihood: for regression pass a noise model, SWAGModule(..., "
            "noise=σ or noise='heteroscedastic'), or call fit_noise(held_out_loader) first."
        )


class _Mixture(Likelihood):
    """The Gaussian mixture over weight samples; subclasses say how outputs become components."""

    task = "regression"
    needs_samples = True

    @abstractmethod
    def components(self, outputs: Outputs) -> tuple[Tensor, Tensor]:
        """Per-sample means and noise variances ``[S, B, ...]`` (the variances may broadcast)."""

    def summarize(self, chunks: Iterable[Outputs]) -> dict[str, Tensor]:
        return gaussian_mixture_summary(self.components(outputs) for outputs in chunks)

    def sample_entries(self, outputs: Outputs) -> dict[str, Tensor]:
        mean, variance = self.components(outputs)
        return {"samples": mean, "sample_variances": variance.expand_as(mean)}

    def summarize_gaussian(self, mean: Tensor, variance: Tensor) -> dict[str, Tensor]:
        """The mixture of the ``J`` Gaussians over the outputs (one per posterior), each with the
        linearised variance of its mean output plus the noise variance: ``samples`` and
        ``sample_variances`` ``[J, B, ...]`` are its components."""
        means, noise = self.linearized_components(mean, variance)
        epistemic = self.epistemic_part(variance)
        spread, centre = means.var(dim=0, correction=0), means.mean(dim=0)
        summary = mixture_summary(centre, epistemic.mean(dim=0) + spread, noise.mean(dim=0))
        return {**summary, "samples": means, "sample_variances": epistemic + noise}

    @abstractmethod
    def linearized_components(self, mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and the noise variance of a Gaussian over the outputs."""

    def epistemic_part(self, variance: Tensor) -> Tensor:
        """The variance of the mean output, from the variance of every output."""
        return variance

    def test_metrics(self, summary: Mapping[str, Tensor]) -> TestMetrics:
        source = RegressionUncertaintyMetrics()
        return TestMetrics({"source": source}, values_of(source, _MIXTURE_TEST_KEYS))

    def update_test_metrics(self, metrics: TestMetrics, summary: Mapping[str, Tensor], targets: Any) -> None:
        means, variances = summary["samples"], summary["sample_variances"]
        metrics.sources["source"].update(means, variances, regression_targets(targets, summary["mean"]))
        metrics.count_batch()

    def _stacked(
        self, summaries: list[dict[str, Tensor]], targets: list[Any]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample means and variances ``[S, N]`` and targets ``[N]`` over all held-out batches."""
        means = torch.cat([s["samples"].reshape(s["samples"].shape[0], -1) for s in summaries], dim=1)
        variances = torch.cat([s["sample_variances"].reshape(means.shape[0], -1) for s in summaries], dim=1)
        flat = torch.cat(
            [regression_targets(t, s["mean"]).reshape(-1) for s, t in zip(summaries, targets, strict=True)]
        )
        return means, variances, flat

    def held_out_score(
        self, summaries: list[dict[str, Tensor]], targets: list[Any]
    ) -> tuple[float, dict[str, Any]]:
        means, variances, flat = self._stacked(summaries, targets)
        if not (bool(torch.isfinite(means).all()) and bool(torch.isfinite(variances).all())):
            return float("inf"), {}  # so large a scale that outputs overflow: the worst candidate
        return float(gaussian_mixture_nll(means, variances, flat)), {}


class GaussianNoise(_Mixture):
    """Homoscedastic noise ``σ`` (``tune_scale`` refits it for every candidate scale, since the two trade
    off, keeping the components' own variances: those of the linearised predictive).

    Args:
        sigma: the noise standard deviation, ``> 0``.
    """

    fits_noise = True

    def __init__(self, sigma: float) -> None:
        self.sigma = float(sigma)

    def components(self, outputs: Outputs) -> tuple[Tensor, Tensor]:
        assert isinstance(outputs, Tensor)
        return outputs, torch.full((), self.sigma**2, dtype=outputs.dtype, device=outputs.device)

    def linearized_components(self, mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
        return mean, torch.full_like(mean, self.sigma**2)

    def held_out_score(
        self, summaries: list[dict[str, Tensor]], targets: list[Any]
    ) -> tuple[float, dict[str, Any]]:
        means, variances, flat = self._stacked(summaries, targets)
        if not (bool(torch.isfinite(means).all()) and bool(torch.isfinite(variances).all())):
            return float("inf"), {}
        # the components' own variances: the linearised predictive's (weight samples have none)
        epistemic = (variances - self.sigma**2).clamp_min(0)
        sigma = fit_gaussian_noise(means, flat, epistemic if bool(epistemic.any()) else None)
        return float(gaussian_mixture_nll(means, epistemic + sigma**2, flat)), {"noise": sigma}


class Heteroscedastic(_Mixture):
    """The model predicts its noise: last output dimension ``(mean, log-variance)``, or a
    ``(mean, variance)`` pair from ``output_transform``."""

    accepts_pairs = True

    def components(self, outputs: Outputs) -> tuple[Tensor, Tensor]:
        if isinstance(outputs, tuple):
            means, variances = outputs
            if bool((variances < 0).any()):
                raise ValueError("output_transform returned negative variances; return (mean, variance).")
            return means, variances
        return heteroscedastic_mean_variance(outputs)

    def linearized_components(self, mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
        means, noise = heteroscedastic_mean_variance(mean)
        return means, noise

    def epistemic_part(self, variance: Tensor) -> Tensor:
        return variance[..., 0]
