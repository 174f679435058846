"""Regression metrics of the Gaussian-mixture predictive, checked against explicit computations:
loops over Python's ``statistics.NormalDist``, textbook closed forms and seeded Monte Carlo with a
tolerance derived from the sample size."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torchmetrics.functional.regression import continuous_ranked_probability_score

from lightning_swag.metrics import (
    DEFAULT_CALIBRATION_LEVELS,
    RegressionUncertaintyMetrics,
    fit_gaussian_noise,
    gaussian_mixture_cdf,
    gaussian_mixture_crps,
    gaussian_mixture_nll,
    gaussian_mixture_quantile,
    interval_coverage,
    regression_calibration_curve,
    regression_calibration_error,
    regression_metrics,
    rmse,
)


def random_mixture(num_samples: int = 6, num_points: int = 40, seed: int = 0):
    """Per-sample means/variances [S, N] and targets [N] near the mixture (float64)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_samples, num_points, generator=generator, dtype=torch.float64)
    variances = 0.05 + torch.rand(num_samples, num_points, generator=generator, dtype=torch.float64)
    targets = means.mean(0) + 1.5 * torch.randn(num_points, generator=generator, dtype=torch.float64)
    return means, variances, targets


def loop_cdf(means, variances, value: float, point: int) -> float:
    components = [
        NormalDist(float(means[s, point]), math.sqrt(float(variances[s, point])))
        for s in range(means.shape[0])
    ]
    return sum(c.cdf(value) for c in components) / len(components)


def loop_density(means, variances, value: float, point: int) -> float:
    components = [
        NormalDist(float(means[s, point]), math.sqrt(float(variances[s, point])))
        for s in range(means.shape[0])
    ]
    return sum(c.pdf(value) for c in components) / len(components)


# ------------------------------------------------------------------------------------ NLL
def test_mixture_nll_matches_a_loop_over_densities() -> None:
    means, variances, targets = random_mixture()
    per_point = gaussian_mixture_nll(means, variances, targets, reduction="none")
    expected = [-math.log(loop_density(means, variances, float(targets[n]), n)) for n in range(len(targets))]
    assert per_point.tolist() == pytest.approx(expected, rel=1e-10)
    assert float(gaussian_mixture_nll(means, variances, targets)) == pytest.approx(
        sum(expected) / len(expected)
    )


def test_mixture_nll_against_monte_carlo_over_weight_samples() -> None:
    """With component means μ_s ~ N(a, b²), the mixture (1/S) Σ N(y; μ_s, σ²) is a Monte-Carlo
    estimate of the density N(y; a, b² + σ²). The error of log p̂ is about (p̂ − p)/p, whose standard
    error is the sample std of the component densities / (√S p); we allow 5 standard errors."""
    a, b, sigma, num_samples = 0.3, 0.8, 0.5, 200_000
    generator = torch.Generator().manual_seed(0)
    mus = a + b * torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    for y in (0.0, 1.2, -1.5):
        targets = torch.tensor([y], dtype=torch.float64)
        estimate = float(gaussian_mixture_nll(mus, sigma**2, targets))
        exact = -math.log(NormalDist(a, math.sqrt(b * b + sigma * sigma)).pdf(y))
        densities = torch.exp(-0.5 * (y - mus) ** 2 / sigma**2) / math.sqrt(2 * math.pi * sigma**2)
        relative_se = float(densities.std() / densities.mean()) / math.sqrt(num_samples)
        assert relative_se < 0.01  # the check is sharp: a 1% error would be caught
        assert abs(estimate - exact) < 5 * relative_se


def test_mixture_nll_is_stable_far_from_the_components() -> None:
    means = torch.tensor([[0.0], [1e-3]], dtype=torch.float64)
    variances = torch.full_like(means, 1e-6)
    targets = torch.tensor([1e3], dtype=torch.float64)
    value = float(gaussian_mixture_nll(means, variances, targets))
    # log-sum-exp by hand: the nearer component dominates completely.
    nearest = 0.5 * math.log(2 * math.pi * 1e-6) + (1e3 - 1e-3) ** 2 / (2 * 1e-6)
    far = 0.5 * math.log(2 * math.pi * 1e-6) + 1e3**2 / (2 * 1e-6)
    expected = math.log(2) + nearest - math.log1p(math.exp(nearest - far))
    assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-12)


def test_float32_inputs_are_scored_in_float64() -> None:
    means, variances, targets = random_mixture()
    low = gaussian_mixture_nll(means.float(), variances.float(), targets.float())
    high = gaussian_mixture_nll(means.float().double(), variances.float().double(), targets.float().double())
    assert low.dtype == torch.float64 and float(low) == pytest.approx(float(high), rel=1e-12)


# ------------------------------------------------------------------------------------ CDF, quantiles
def test_mixture_cdf_matches_normal_dist_loop() -> None:
    means, variances, targets = random_mixture()
    cdf = gaussian_mixture_cdf(means, variances, targets)
    expected = [loop_cdf(means, variances, float(targets[n]), n) for n in range(len(targets))]
    assert cdf.tolist() == pytest.approx(expected, abs=1e-12)


def test_quantiles_invert_the_cdf() -> None:
    means, variances, _ = random_mixture()
    levels = [0.01, 0.05, 0.25, 0.5, 0.9, 0.999]
    quantiles = gaussian_mixture_quantile(means, variances, levels)
    assert quantiles.shape == (len(levels), means.shape[1])
    for i, level in enumerate(levels):
        for n in range(0, means.shape[1], 7):
            assert loop_cdf(means, variances, float(quantiles[i, n]), n) == pytest.approx(level, abs=1e-12)
    assert bool((quantiles.diff(dim=0) > 0).all())


def test_quantile_of_one_gaussian_is_its_inverse_cdf() -> None:
    means = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    variances = torch.tensor([[4.0, 0.25]], dtype=torch.float64)
    q = gaussian_mixture_quantile(means, variances, 0.95)
    assert q.shape == (2,)
    assert float(q[0]) == pytest.approx(NormalDist(0.5, 2.0).inv_cdf(0.95), rel=1e-12)
    assert float(q[1]) == pytest.approx(NormalDist(-2.0, 0.5).inv_cdf(0.95), rel=1e-12)


def test_quantile_levels_are_checked() -> None:
    means, variances, _ = random_mixture()
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        gaussian_mixture_quantile(means, variances, [0.5, 1.0])


# ------------------------------------------------------------------------------------ coverage, calibration
def test_coverage_matches_explicit_quantile_intervals() -> None:
    means, variances, targets = random_mixture(num_points=200, seed=3)
    for level in (0.5, 0.9, 0.95):
        lower, upper = gaussian_mixture_quantile(means, variances, [(1 - level) / 2, (1 + level) / 2])
        inside = sum(
            1 for n in range(len(targets)) if float(lower[n]) <= float(targets[n]) <= float(upper[n])
        )
        assert float(interval_coverage(means, variances, targets, level)) == pytest.approx(
            inside / len(targets)
        )


def test_coverage_of_a_known_gaussian_is_nominal() -> None:
    """Targets drawn from the predictive itself: coverage within 4 binomial standard errors."""
    num_points = 20_000
    generator = torch.Generator().manual_seed(4)
    mu = torch.randn(num_points, generator=generator, dtype=torch.float64)
    sigma = 0.2 + torch.rand(num_points, generator=generator, dtype=torch.float64)
    targets = mu + sigma * torch.randn(num_points, generator=generator, dtype=torch.float64)
    for level in (0.5, 0.9, 0.95):
        se = math.sqrt(level * (1 - level) / num_points)
        coverage = float(interval_coverage(mu[None], sigma[None] ** 2, targets, level))
        assert abs(coverage - level) < 4 * se
    # Every |p̂ − p| has a standard error of at most 0.5/√N = 0.0035; their mean stays well below 4 of them.
    assert float(regression_calibration_error(mu[None], sigma[None] ** 2, targets)) < 0.014
    # Intervals half as wide as they should be: the 90% one covers P(|Z| <= 1.645 / 2) = 0.589.
    narrow = float(interval_coverage(mu[None], (sigma[None] / 2) ** 2, targets, 0.9))
    expected = 2 * NormalDist().cdf(NormalDist().inv_cdf(0.95) / 2) - 1
    assert abs(narrow - expected) < 4 * math.sqrt(expected * (1 - expected) / num_points)


def test_calibration_curve_and_error_by_hand() -> None:
    # One standard-normal predictive per point; targets placed at known PIT values u.
    pit = [0.02, 0.12, 0.31, 0.37, 0.61, 0.63, 0.97, 0.99]  # none on a level of the grid
    targets = torch.tensor([NormalDist().inv_cdf(u) for u in pit], dtype=torch.float64)
    means, variances = torch.zeros(1, len(pit), dtype=torch.float64), 1.0
    levels = [0.25, 0.5, 0.75]
    nominal, observed = regression_calibration_curve(means, variances, targets, levels)
    assert nominal.tolist() == pytest.approx(levels)
    assert observed.tolist() == pytest.approx([2 / 8, 4 / 8, 6 / 8])
    error = float(regression_calibration_error(means, variances, targets, levels))
    assert error == pytest.approx((abs(0.25 - 0.25) + abs(0.5 - 0.5) + abs(0.75 - 0.75)) / 3)
    expected = sum(abs(sum(u <= p for u in pit) / 8 - p) for p in DEFAULT_CALIBRATION_LEVELS) / 19
    assert float(regression_calibration_error(means, variances, targets)) == pytest.approx(
        expected, abs=1e-12
    )


def test_calibration_curve_matches_a_loop_on_a_mixture() -> None:
    means, variances, targets = random_mixture(num_points=60, seed=5)
    nominal, observed = regression_calibration_curve(means, variances, targets)
    pits = [loop_cdf(means, variances, float(targets[n]), n) for n in range(len(targets))]
    for p, o in zip(nominal.tolist(), observed.tolist(), strict=True):
        assert o == pytest.approx(sum(u <= p for u in pits) / len(pits))


# ------------------------------------------------------------------------------------ CRPS
def gaussian_crps(mu: float, sigma: float, y: float) -> float:
    """Gneiting & Raftery (2007): σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π], z = (y − μ)/σ."""
    z = (y - mu) / sigma
    return sigma * (z * (2 * NormalDist().cdf(z) - 1) + 2 * NormalDist().pdf(z) - 1 / math.sqrt(math.pi))


def test_crps_of_one_gaussian_is_the_textbook_formula() -> None:
    means = torch.tensor([[0.0, 1.0, -3.0]], dtype=torch.float64)
    variances = torch.tensor([[1.0, 0.25, 9.0]], dtype=torch.float64)
    targets = torch.tensor([0.4, -1.0, 2.0], dtype=torch.float64)
    values = gaussian_mixture_crps(means, variances, targets, reduction="none")
    expected = [gaussian_crps(0.0, 1.0, 0.4), gaussian_crps(1.0, 0.5, -1.0), gaussian_crps(-3.0, 3.0, 2.0)]
    assert values.tolist() == pytest.approx(expected, rel=1e-12)


def test_crps_without_noise_is_torchmetrics_ensemble_crps() -> None:
    means, _, targets = random_mixture(num_samples=9, num_points=30, seed=6)
    ours = gaussian_mixture_crps(means, 0.0, targets)
    theirs = continuous_ranked_probability_score(means.T.contiguous(), targets)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-12)


def test_crps_of_a_mixture_against_monte_carlo() -> None:
    """E|X − y| − ½ E|X − X'| from 400,000 seeded draws of the mixture; 5 standard errors."""
    means = torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64)
    variances = torch.tensor([[0.3], [1.0], [0.1]], dtype=torch.float64)
    y = 0.7
    exact = float(gaussian_mixture_crps(means, variances, torch.tensor([y], dtype=torch.float64)))
    num_draws = 400_000
    generator = torch.Generator().manual_seed(7)

    def draw() -> torch.Tensor:
        component = torch.randint(0, 3, (num_draws,), generator=generator)
        noise = torch.randn(num_draws, generator=generator, dtype=torch.float64)
        return means[component, 0] + variances[component, 0].sqrt() * noise

    x, x_prime = draw(), draw()
    first, second = (x - y).abs(), (x - x_prime).abs()
    estimate = float(first.mean() - 0.5 * second.mean())
    se = math.sqrt(float(first.var()) / num_draws + 0.25 * float(second.var()) / num_draws)
    assert abs(estimate - exact) < 5 * se


# ------------------------------------------------------------------------------------ RMSE, bundle
def test_rmse_matches_a_loop_and_accepts_any_target_shape() -> None:
    predictions = torch.tensor([1.0, 2.0, 3.0, 4.5])
    targets = torch.tensor([[1.5], [2.0], [2.0], [4.0]])
    expected = math.sqrt((0.25 + 0 + 1 + 0.25) / 4)
    assert float(rmse(predictions, targets)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="same, non-zero number of elements"):
        rmse(predictions, targets[:3])


def test_regression_metrics_bundles_the_functions() -> None:
    means, variances, targets = random_mixture(num_points=100, seed=8)
    result = regression_metrics(means, variances, targets)
    assert result["nll"] == pytest.approx(float(gaussian_mixture_nll(means, variances, targets)))
    assert result["crps"] == pytest.approx(float(gaussian_mixture_crps(means, variances, targets)))
    assert result["rmse"] == pytest.approx(float(rmse(means.mean(0), targets)))
    for level in (0.5, 0.9, 0.95):
        key = f"coverage_{100 * level:g}"
        assert result[key] == pytest.approx(float(interval_coverage(means, variances, targets, level)))
    assert result["calibration_error"] == pytest.approx(
        float(regression_calibration_error(means, variances, targets))
    )
    total_std = (means.var(0, correction=0) + variances.mean(0)).sqrt().mean()
    assert result["mean_std"] == pytest.approx(float(total_std))
    assert set(result) == {
        "nll",
        "rmse",
        "crps",
        "calibration_error",
        "mean_std",
        "coverage_50",
        "coverage_90",
        "coverage_95",
    }


def test_input_validation() -> None:
    means, variances, targets = random_mixture()
    with pytest.raises(ValueError, match="sample"):
        gaussian_mixture_nll(means[0], variances[0], targets)
    with pytest.raises(ValueError, match="finite and >= 0"):
        gaussian_mixture_nll(means, -variances, targets)
    with pytest.raises(ValueError, match="one value per point"):
        gaussian_mixture_nll(means, variances, targets[:-1])
    with pytest.raises(ValueError, match="do not broadcast"):
        gaussian_mixture_nll(means, variances[:, :3], targets)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        interval_coverage(means, variances, targets, level=1.0)


# ------------------------------------------------------------------------------------ accumulating metric
@pytest.mark.filterwarnings("ignore:.*was called before the ``update`` method")
def test_accumulated_metrics_equal_the_functions_on_all_data() -> None:
    means, variances, targets = random_mixture(num_points=150, seed=9)
    metric = RegressionUncertaintyMetrics()
    for start in range(0, 150, 40):
        metric.update(
            means[:, start : start + 40], variances[:, start : start + 40], targets[start : start + 40]
        )
    accumulated = metric.compute()
    expected = regression_metrics(means, variances, targets)
    assert set(accumulated) == set(expected)
    for key, value in expected.items():
        assert float(accumulated[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_accumulated_states_merge_like_processes() -> None:
    means, variances, targets = random_mixture(num_points=80, seed=10)
    first, second, whole = (RegressionUncertaintyMetrics() for _ in range(3))
    first.update(means[:, :30], variances[:, :30], targets[:30])
    second.update(means[:, 30:], variances[:, 30:], targets[30:])
    whole.update(means, variances, targets)
    first.merge_state(second)
    for key, value in whole.compute().items():
        assert float(first.compute()[key]) == pytest.approx(float(value), rel=1e-5), key


def test_accumulated_metric_takes_homoscedastic_noise_and_shaped_targets() -> None:
    means, _, targets = random_mixture(num_points=20, seed=11)
    metric = RegressionUncertaintyMetrics(coverage_levels=(0.8,))
    metric.update(means[..., None], 0.25, targets[:, None])
    result = metric.compute()
    assert float(result["coverage_80"]) == pytest.approx(float(interval_coverage(means, 0.25, targets, 0.8)))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        RegressionUncertaintyMetrics(coverage_levels=(0.0,))


# ------------------------------------------------------------------------------------ noise fitting
def test_fit_noise_with_one_sample_is_the_rms_residual() -> None:
    means, _, targets = random_mixture(num_samples=1, num_points=50, seed=12)
    expected = math.sqrt(sum((float(targets[n]) - float(means[0, n])) ** 2 for n in range(50)) / 50)
    assert fit_gaussian_noise(means, targets) == pytest.approx(expected, rel=1e-12)


def test_fit_noise_of_a_mixture_is_the_likelihood_maximum() -> None:
    means, _, targets = random_mixture(num_samples=5, num_points=80, seed=13)
    sigma = fit_gaussian_noise(means, targets)
    assert fit_gaussian_noise(means, targets) == sigma  # deterministic
    # A dense grid over log σ finds no better value.
    grid = torch.linspace(math.log(0.05), math.log(5.0), 4001, dtype=torch.float64).exp()
    nll = [float(gaussian_mixture_nll(means, float(s) ** 2, targets)) for s in grid]
    best = float(grid[min(range(len(nll)), key=nll.__getitem__)])
    assert float(gaussian_mixture_nll(means, sigma**2, targets)) <= min(nll) + 1e-12
    assert sigma == pytest.approx(best, rel=2e-3)  # the grid spacing is 0.12%
    # Stationarity: σ² equals the responsibility-weighted mean squared residual (the EM fixed point).
    squared = (targets - means) ** 2
    log_weights = -0.5 * squared / sigma**2
    responsibilities = torch.softmax(log_weights, dim=0)
    assert float((responsibilities * squared).sum(0).mean()) == pytest.approx(sigma**2, rel=1e-7)


def test_fit_noise_with_component_variances_is_the_likelihood_maximum() -> None:
    means, variances, targets = random_mixture(num_samples=3, num_points=80, seed=14)
    sigma = fit_gaussian_noise(means, targets, variances)
    assert fit_gaussian_noise(means, targets, variances) == sigma  # deterministic
    # A dense grid over log σ of the NLL of the mixture of N(m, v + σ²), written out here.
    grid = torch.linspace(math.log(1e-3), math.log(5.0), 8001, dtype=torch.float64).exp()
    total = variances.double()[None] + grid.reshape(-1, 1, 1).square()  # [G, S, N]
    log_density = -0.5 * (
        torch.log(2 * math.pi * total) + (targets.double() - means.double())[None].square() / total
    )
    nll = -(torch.logsumexp(log_density, dim=1) - math.log(3)).mean(dim=1)
    best = float(grid[int(nll.argmin())])
    assert sigma == pytest.approx(best, rel=2e-3)  # the grid spacing is 0.11%
    assert float(gaussian_mixture_nll(means, variances + sigma**2, targets)) <= float(nll.min()) + 1e-12
    # Variances that explain every residual: σ at the bottom of its bracket, no error.
    assert fit_gaussian_noise(means, targets, variances + 100.0) < 1e-4


def test_fit_noise_rejects_exact_predictions() -> None:
    means = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="exactly"):
        fit_gaussian_noise(means, torch.zeros(4))
