"""The Bernoulli likelihoods against sigmoid sums written out here."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_swag.likelihoods.bernoulli import Binary, Multilabel


def _logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log() + (1 - p) * (1 - p).log())


def test_summary_of_every_element_in_chunks() -> None:
    logits = _logits(6, 4, 1, 3, 3)  # dense masks: every element its own decision
    probs = 1 / (1 + (-logits).exp())
    mean = probs.mean(dim=0)
    expected = {
        "mean": mean,
        "std": ((probs - mean) ** 2).mean(dim=0).sqrt(),
        "entropy": _bernoulli_entropy(mean),
        "mutual_information": _bernoulli_entropy(mean) - _bernoulli_entropy(probs).mean(dim=0),
    }
    for chunks in ([logits], [logits[:1], logits[1:4], logits[4:]]):
        out = Binary().summarize(chunks)
        for key, value in expected.items():
            torch.testing.assert_close(out[key], value)
    one = Binary().summarize([logits[:1]])
    assert torch.equal(one["mutual_information"], torch.zeros_like(mean))


def test_saturated_logits_have_finite_entropies() -> None:
    out = Binary().summarize([torch.tensor([[[200.0], [-200.0]], [[200.0], [0.0]]])])
    assert bool(torch.isfinite(out["entropy"]).all()) and bool(
        torch.isfinite(out["mutual_information"]).all()
    )
    assert float(out["entropy"][0, 0]) == 0.0


def test_probit_summary_of_a_gaussian_over_the_logits() -> None:
    mean, variance = _logits(2, 5, 3, seed=1), _logits(2, 5, 3, seed=2).abs()
    out = Multilabel().summarize_gaussian(mean, variance)
    probs = torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * variance))
    torch.testing.assert_close(out["mean"], probs.mean(dim=0))
    torch.testing.assert_close(out["std"], (probs[0] - probs[1]).abs() / 2)
    expected = _bernoulli_entropy(probs.mean(0)) - _bernoulli_entropy(probs).mean(0)
    torch.testing.assert_close(out["mutual_information"], expected)


def test_held_out_score_and_test_metrics_skip_ignored_targets() -> None:
    likelihood = Multilabel(ignore_index=-100)
    logits = _logits(4, 6, 3, seed=3)
    targets = torch.randint(0, 2, (6, 3), generator=torch.Generator().manual_seed(4))
    targets[1] = -100
    summary = likelihood.summarize([logits])
    keep = targets != -100
    p, y = summary["mean"][keep], targets[keep].double()
    nll = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    score, fitted = likelihood.held_out_score([summary], [targets])
    assert score == pytest.approx(float(nll), rel=1e-9) and fitted == {}
    metrics = likelihood.test_metrics(summary)
    likelihood.update_test_metrics(metrics, summary, targets)
    assert float(metrics.logged["accuracy"].compute()) == pytest.approx(
        float(((p >= 0.5) == y).double().mean())
    )
    assert float(metrics.logged["nll"].compute()) == pytest.approx(float(nll), rel=1e-5)
    assert float(metrics.logged["brier"].compute()) == pytest.approx(float(((p - y) ** 2).mean()), rel=1e-5)
    mutual = summary["mutual_information"][keep].mean()
    assert float(metrics.logged["mutual_information"].compute()) == pytest.approx(float(mutual), rel=1e-5)


def test_one_target_per_row_for_one_logit_per_row() -> None:
    likelihood = Binary()
    summary = likelihood.summarize([_logits(3, 5, 1, seed=5)])
    targets = torch.tensor([0, 1, 1, 0, 1])
    flat, _ = likelihood.held_out_score([summary], [targets])
    column, _ = likelihood.held_out_score([summary], [targets[:, None]])
    assert flat == column
    with pytest.raises(ValueError, match="give one 0/1 target per output element"):
        likelihood.held_out_score([summary], [targets[:4]])


def test_outputs_of_the_wrong_rank_are_refused() -> None:
    with pytest.raises(ValueError, match="need a batch dimension"):
        Binary().check_outputs(_logits(3))
    with pytest.raises(ValueError, match="for one logit per row use task='binary'"):
        Multilabel().check_outputs(_logits(3, 4))
    Multilabel().check_outputs(_logits(3, 4, 2))
    assert (Binary().describe(), Multilabel().describe()) == ("binary", "multilabel")
