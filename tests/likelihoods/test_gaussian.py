"""The regression likelihoods against Gaussian mixtures written out here."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_swag.likelihoods.gaussian import GaussianNoise, Heteroscedastic, Regression, regression_targets


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mixture_nll(means: torch.Tensor, variances: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over points of −log (1/S) Σ_s N(y; μ_s, σ²_s), summed out here."""
    densities = torch.exp(-((targets - means) ** 2) / (2 * variances)) / torch.sqrt(2 * math.pi * variances)
    return float(-densities.mean(dim=0).log().mean())


def test_regression_targets_take_the_outputs_shape() -> None:
    mean = torch.zeros(4, 1)
    assert regression_targets(torch.ones(4), mean).shape == (4, 1)
    same = torch.ones(4, 1)
    assert regression_targets(same, mean) is same
    with pytest.raises(
        ValueError, match=r"targets of shape \(4, 2\) do not match the model's outputs of shape"
    ):
        regression_targets(torch.ones(4, 2), mean)


def test_no_noise_model_gives_the_spread_of_the_samples() -> None:
    outputs = _randn(6, 5, 2)
    out = Regression().summarize([outputs[:4], outputs[4:]])
    torch.testing.assert_close(out["mean"], outputs.sum(0) / 6)
    torch.testing.assert_close(out["std"], ((outputs - outputs.mean(0)) ** 2).mean(0).sqrt())
    mean, variance = _randn(2, 5, 1, seed=1), _randn(2, 5, 1, seed=2) ** 2
    linear = Regression().summarize_gaussian(mean, variance)
    torch.testing.assert_close(linear["mean"], (mean[0] + mean[1]) / 2)
    torch.testing.assert_close(
        linear["std"], ((variance[0] + variance[1]) / 2 + ((mean[0] - mean[1]) / 2) ** 2).sqrt()
    )
    with pytest.raises(ValueError, match="tune_scale needs a likelihood"):
        Regression().held_out_score([out], [torch.zeros(5, 2)])


def test_regression_test_metrics_are_the_rmse_and_the_mean_std() -> None:
    likelihood = Regression()
    outputs, targets = _randn(4, 8, 1, seed=3), _randn(8, seed=4)
    summary = likelihood.summarize([outputs])
    metrics = likelihood.test_metrics(summary)
    likelihood.update_test_metrics(metrics, summary, targets)
    rmse = float(((summary["mean"][:, 0] - targets) ** 2).mean().sqrt())
    assert float(metrics.logged["rmse"].compute()) == pytest.approx(rmse, rel=1e-5)
    assert float(metrics.logged["mean_std"].compute()) == pytest.approx(
        float(summary["std"].mean()), rel=1e-5
    )


def test_homoscedastic_noise_is_the_mixture_of_the_samples_with_sigma() -> None:
    likelihood = GaussianNoise(0.5)
    outputs = _randn(5, 7, 1, seed=5)
    out = likelihood.summarize([outputs[:2], outputs[2:]])
    spread = ((outputs - outputs.mean(0)) ** 2).mean(0)
    torch.testing.assert_close(out["mean"], outputs.mean(0))
    torch.testing.assert_close(out["epistemic_std"], spread.sqrt())
    torch.testing.assert_close(out["aleatoric_std"], torch.full_like(spread, 0.5))
    torch.testing.assert_close(out["std"], (spread + 0.25).sqrt())
    entries = likelihood.sample_entries(outputs)
    assert torch.equal(entries["samples"], outputs)
    torch.testing.assert_close(entries["sample_variances"], torch.full_like(outputs, 0.25))


def test_homoscedastic_held_out_score_refits_sigma() -> None:
    likelihood = GaussianNoise(0.5)
    outputs, targets = _randn(1, 50, 1, seed=6), _randn(50, seed=7)
    summary = {"mean": outputs[0], **likelihood.sample_entries(outputs)}
    score, fitted = likelihood.held_out_score([summary], [targets])
    sigma = float((targets - outputs[0, :, 0]).square().mean().sqrt())  # one component: the rms residual
    assert fitted["noise"] == pytest.approx(sigma, rel=1e-6)
    variance = torch.full_like(outputs[:, :, 0], sigma**2)
    assert score == pytest.approx(_mixture_nll(outputs[:, :, 0], variance, targets), rel=1e-6)


def test_heteroscedastic_outputs_are_mean_and_log_variance() -> None:
    likelihood = Heteroscedastic()
    outputs = _randn(4, 6, 2, seed=8)
    means, variances = outputs[..., 0], outputs[..., 1].exp()
    out = likelihood.summarize([outputs])
    torch.testing.assert_close(out["mean"], means.mean(0))
    torch.testing.assert_close(out["aleatoric_std"], variances.mean(0).sqrt())
    torch.testing.assert_close(out["std"], (means.var(0, correction=0) + variances.mean(0)).sqrt())
    paired = likelihood.summarize([(means[:2], variances[:2]), (means[2:], variances[2:])])
    for key, value in out.items():
        torch.testing.assert_close(paired[key], value)
    targets = _randn(6, seed=9)
    summary = {**out, **likelihood.sample_entries(outputs)}
    score, fitted = likelihood.held_out_score([summary], [targets])
    assert score == pytest.approx(_mixture_nll(means, variances, targets), rel=1e-6) and fitted == {}
    with pytest.raises(ValueError, match="negative variances"):
        likelihood.summarize([(means, -variances)])
    with pytest.raises(ValueError, match="last dimension of size 2"):
        likelihood.summarize([_randn(4, 6, 3)])


def test_linearised_heteroscedastic_mixture_adds_the_mean_outputs_variance_to_the_noise() -> None:
    likelihood = Heteroscedastic()
    mean, variance = _randn(2, 3, 2, seed=10), _randn(2, 3, 2, seed=11) ** 2  # one Gaussian per posterior
    out = likelihood.summarize_gaussian(mean, variance)
    means, noise = mean[..., 0], mean[..., 1].exp()
    components = variance[..., 0] + noise
    torch.testing.assert_close(out["samples"], means)
    torch.testing.assert_close(out["sample_variances"], components)
    total = components.mean(0) + means.var(0, correction=0)
    torch.testing.assert_close(out["std"], total.sqrt())
    torch.testing.assert_close(out["aleatoric_std"], noise.mean(0).sqrt())


def test_mixture_test_metrics_score_the_mixture() -> None:
    likelihood = GaussianNoise(0.3)
    outputs, targets = _randn(5, 10, 1, seed=12), _randn(10, 1, seed=13)
    summary = {**likelihood.summarize([outputs]), **likelihood.sample_entries(outputs)}
    metrics = likelihood.test_metrics(summary)
    likelihood.update_test_metrics(metrics, summary, targets)
    expected = _mixture_nll(outputs[..., 0], torch.full_like(outputs[..., 0], 0.09), targets[:, 0])
    assert float(metrics.logged["nll"].compute()) == pytest.approx(expected, rel=1e-5)
    rmse = float(((outputs.mean(0) - targets) ** 2).mean().sqrt())
    assert float(metrics.logged["rmse"].compute()) == pytest.approx(rmse, rel=1e-5)
    assert {"crps", "calibration_error", "coverage_90"} <= set(metrics.logged)
