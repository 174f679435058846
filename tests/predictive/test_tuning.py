"""Choosing the scale and the noise on held-out data, checked against likelihoods computed here."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_swag.likelihoods import Heteroscedastic
from lightning_swag.predictive.tuning import fit_noise, tune_scale


def _batches(
    seed: int = 0, n: int = 3, size: int = 40, std: float = 1.0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, generator=g), std * torch.randn(size, generator=g)) for _ in range(n)]


def _zero_mean_predict(inputs: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """A one-component Gaussian predictive ``N(0, scale)`` (``scale`` plays the variance)."""
    zeros = torch.zeros(1, inputs.shape[0], dtype=torch.float64)
    return {"mean": zeros[0], "samples": zeros, "sample_variances": torch.full_like(zeros, scale)}


def test_tune_scale_scores_each_candidate_by_the_held_out_nll() -> None:
    batches = _batches()
    targets = torch.cat([t for _, t in batches]).double()
    scores, best, fitted = tune_scale(_zero_mean_predict, Heteroscedastic(), batches, [0.25, 1.0, 4.0])
    for scale, score in scores.items():
        expected = -torch.distributions.Normal(0.0, math.sqrt(scale)).log_prob(targets).mean()
        assert score == pytest.approx(float(expected), rel=1e-6)
    assert best == 1.0 == min(scores, key=scores.__getitem__) and fitted == {}


def test_tune_scale_warns_when_the_best_candidate_is_at_the_edge() -> None:
    batches = _batches(std=3.0)
    with pytest.warns(
        UserWarning, match=r"best candidate, scale=1, is at the edge of the candidates \[0.25, 0.5, 1.0\]"
    ):
        _, best, _ = tune_scale(_zero_mean_predict, Heteroscedastic(), batches, [0.25, 0.5, 1.0])
    assert best == 1.0


def test_tune_scale_returns_the_options_fitted_for_the_best_candidate() -> None:
    class Fits:
        """A likelihood whose score is ``|scale − 2|`` and which 'fits' σ = scale."""

        def held_out_score(self, summaries, targets):
            scale = float(summaries[0]["scale"])
            return abs(scale - 2.0), {"noise": scale}

    predict = lambda inputs, scale: {"scale": torch.tensor(scale)}  # noqa: E731
    scores, best, fitted = tune_scale(predict, Fits(), _batches(n=1), [1.0, 2.0, 3.0])  # type: ignore[arg-type]
    assert scores == {1.0: 1.0, 2.0: 0.0, 3.0: 1.0} and best == 2.0 and fitted == {"noise": 2.0}


@pytest.mark.parametrize("scales", [[], 1.0, [1.0, -0.5], [math.nan], ["1"]])
def test_tune_scale_refuses_anything_but_a_sequence_of_scales(scales) -> None:
    with pytest.raises(ValueError, match="scales must be a non-empty sequence of finite numbers >= 0"):
        tune_scale(_zero_mean_predict, Heteroscedastic(), _batches(n=1), scales)


def test_fit_noise_of_one_component_is_the_rms_residual() -> None:
    batches = _batches(seed=1, std=0.7)

    def components(inputs):
        return 0.5 * inputs.T.double(), None  # [1, B] means, no variances of their own

    residuals = torch.cat([t.double() - 0.5 * x[:, 0].double() for x, t in batches])
    assert fit_noise(components, batches) == pytest.approx(float(residuals.square().mean().sqrt()), rel=1e-6)


def test_fit_noise_subtracts_the_components_own_variance() -> None:
    batches = _batches(seed=2, std=2.0)
    targets = torch.cat([t for _, t in batches]).double()

    def components(inputs):
        zeros = torch.zeros(1, inputs.shape[0], dtype=torch.float64)
        return zeros, torch.full_like(zeros, 1.5)

    # one Gaussian N(0, 1.5 + σ²): the likelihood is largest at σ² = mean(y²) − 1.5
    expected = math.sqrt(float(targets.square().mean()) - 1.5)
    assert fit_noise(components, batches) == pytest.approx(expected, rel=1e-5)


def test_fit_noise_refuses_non_finite_outputs() -> None:
    batches = _batches(n=1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_noise(lambda inputs: (torch.full((1, inputs.shape[0]), math.nan), None), batches)
