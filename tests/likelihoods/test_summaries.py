"""BMA summaries checked against explicit loops over the weight samples."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_swag.likelihoods.summaries import (
    heteroscedastic_mean_variance,
    summarize_classification,
    summarize_gaussian_mixture,
    summarize_heteroscedastic,
    summarize_regression,
)


def random_mixture(num_samples: int = 7, batch: int = 5, dim: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_samples, batch, dim, generator=generator, dtype=torch.float64)
    variances = torch.rand(num_samples, batch, dim, generator=generator, dtype=torch.float64) + 0.05
    return means, variances


def test_gaussian_mixture_matches_loops_and_the_law_of_total_variance() -> None:
    means, variances = random_mixture()
    out = summarize_gaussian_mixture(means, variances)
    num_samples, batch, dim = means.shape
    for b in range(batch):
        for d in range(dim):
            mus = [float(means[s, b, d]) for s in range(num_samples)]
            vs = [float(variances[s, b, d]) for s in range(num_samples)]
            mean = sum(mus) / num_samples
            # Second moment of the mixture: mean of (σ² + μ²) over the components.
            second = sum(v + m * m for m, v in zip(mus, vs, strict=True)) / num_samples
            epistemic = sum((m - mean) ** 2 for m in mus) / num_samples
            aleatoric = sum(vs) / num_samples
            assert float(out["mean"][b, d]) == pytest.approx(mean, rel=1e-12)
            assert float(out["std"][b, d]) == pytest.approx(math.sqrt(second - mean * mean), rel=1e-10)
            assert float(out["epistemic_std"][b, d]) == pytest.approx(math.sqrt(epistemic), rel=1e-10)
            assert float(out["aleatoric_std"][b, d]) == pytest.approx(math.sqrt(aleatoric), rel=1e-12)
    assert set(out) == {"mean", "std", "epistemic_std", "aleatoric_std"}


def test_gaussian_mixture_homoscedastic_float_noise() -> None:
    means, _ = random_mixture()
    out = summarize_gaussian_mixture(means, 0.3**2)
    assert torch.allclose(out["aleatoric_std"], torch.full_like(out["mean"], 0.3), atol=1e-15)
    assert torch.allclose(out["std"] ** 2, out["epistemic_std"] ** 2 + 0.09, atol=1e-12)


def test_gaussian_mixture_one_sample_has_no_epistemic_part() -> None:
    means, variances = random_mixture(num_samples=1)
    out = summarize_gaussian_mixture(means, variances)
    assert torch.equal(out["epistemic_std"], torch.zeros_like(out["mean"]))
    assert torch.allclose(out["std"], variances[0].sqrt())
    assert torch.equal(out["mean"], means[0])


def test_gaussian_mixture_zero_noise_is_summarize_regression() -> None:
    means, _ = random_mixture()
    out = summarize_gaussian_mixture(means, torch.zeros_like(means))
    plain = summarize_regression(means)
    assert torch.allclose(out["std"], plain["std"]) and torch.allclose(out["mean"], plain["mean"])


def test_gaussian_mixture_rejects_negative_variances() -> None:
    means, variances = random_mixture()
    with pytest.raises(ValueError, match="variances must be >= 0"):
        summarize_gaussian_mixture(means, -variances)


def test_heteroscedastic_split_and_summary() -> None:
    generator = torch.Generator().manual_seed(1)
    outputs = torch.randn(4, 6, 2, generator=generator)
    mean, variance = heteroscedastic_mean_variance(outputs)
    assert mean.shape == variance.shape == (4, 6)
    for s in range(4):
        for b in range(6):
            assert float(mean[s, b]) == float(outputs[s, b, 0])
            assert float(variance[s, b]) == pytest.approx(math.exp(float(outputs[s, b, 1])), rel=1e-6)
    summary = summarize_heteroscedastic(outputs)
    expected = summarize_gaussian_mixture(mean, variance)
    for key, value in expected.items():
        assert torch.equal(summary[key], value)


def test_heteroscedastic_wrong_layout_names_output_transform() -> None:
    with pytest.raises(ValueError, match="output_transform"):
        heteroscedastic_mean_variance(torch.zeros(4, 6, 3))
    with pytest.raises(ValueError, match="last dimension of size 2"):
        heteroscedastic_mean_variance(torch.tensor(1.0))


def test_existing_summaries_unchanged() -> None:
    generator = torch.Generator().manual_seed(2)
    outputs = torch.randn(5, 3, 1, generator=generator)
    out = summarize_regression(outputs)
    assert torch.allclose(out["std"], outputs.std(dim=0, correction=0))
    logits = torch.randn(5, 3, 4, generator=generator)
    probs = torch.softmax(logits, dim=-1)
    out = summarize_classification(logits)
    assert torch.allclose(out["mean"], probs.mean(0))
    entropy = -(out["mean"] * out["mean"].log()).sum(-1)
    assert torch.allclose(out["entropy"], entropy, atol=1e-6)


@pytest.mark.parametrize("block", [1, 7 * 4, 3 * 7 * 4 + 5])
def test_summaries_reduced_in_sample_blocks_equal_the_explicit_moments(monkeypatch, block: int) -> None:
    """Cutting a chunk into blocks of samples (one sample, several, a partial last block) changes
    nothing but rounding: mean, std, entropy and mutual information against explicit formulas."""
    from lightning_swag.likelihoods import summaries

    monkeypatch.setattr(summaries, "BLOCK_ELEMENTS", block)
    logits = torch.randn(11, 7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    mean = probs.mean(dim=0)
    entropy = -(mean * mean.log()).sum(-1)
    mean_entropy = -(probs * probs.log()).sum(-1).mean(0)
    out = summaries.probability_summary(
        [logits[:5], logits[5:]], summaries.softmax_with_entropy, summaries.categorical_entropy
    )
    torch.testing.assert_close(out["mean"], mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(out["std"], ((probs - mean) ** 2).mean(0).sqrt(), rtol=0, atol=1e-13)
    torch.testing.assert_close(out["entropy"], entropy, rtol=0, atol=1e-13)
    torch.testing.assert_close(out["mutual_information"], entropy - mean_entropy, rtol=0, atol=1e-13)
    moments = summaries.moments_summary([logits[:5], logits[5:]])
    torch.testing.assert_close(moments["mean"], logits.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(moments["std"], logits.std(0, correction=0), rtol=0, atol=1e-13)
    assert len(list(summaries.sample_blocks([logits]))) == -(-11 // max(1, block // 28))
