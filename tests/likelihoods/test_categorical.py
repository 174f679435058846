"""The categorical likelihood against softmax sums written out here, for flat and dense outputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_swag.likelihoods.categorical import Categorical


def _logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _expected(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The BMA summary of ``[S, ..., C]`` logits, class axis last, from its definition."""
    probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    mean = probs.mean(dim=0)
    entropy = -(mean * mean.log()).sum(dim=-1)
    per_sample = -(probs * probs.log()).sum(dim=-1)
    return {
        "mean": mean,
        "std": ((probs - mean) ** 2).mean(dim=0).sqrt(),
        "entropy": entropy,
        "mutual_information": entropy - per_sample.mean(dim=0),
    }


def test_summary_of_flat_logits_in_chunks() -> None:
    logits = _logits(7, 5, 4)
    expected = _expected(logits)
    for chunks in ([logits], [logits[:3], logits[3:]], list(logits.split(1))):
        out = Categorical().summarize(chunks)
        for key, value in expected.items():
            torch.testing.assert_close(out[key], value)


@pytest.mark.parametrize("class_dim", [1, -1])
def test_dense_outputs_keep_their_class_axis(class_dim) -> None:
    logits = _logits(4, 2, 3, 5, 6, seed=1)  # [S, B, C, H, W] or [S, B, T1, T2, C]
    out = Categorical(class_dim=class_dim).summarize([logits[:2], logits[2:]])
    axis = 2 if class_dim == 1 else -1
    expected = _expected(logits.movedim(axis, -1))
    torch.testing.assert_close(out["mean"], expected["mean"].movedim(-1, class_dim))
    torch.testing.assert_close(out["std"], expected["std"].movedim(-1, class_dim))
    torch.testing.assert_close(out["entropy"], expected["entropy"])
    torch.testing.assert_close(out["mutual_information"], expected["mutual_information"])


def test_one_sample_has_exactly_zero_mutual_information() -> None:
    out = Categorical().summarize([_logits(1, 6, 3, seed=2)])
    assert torch.equal(out["mutual_information"], torch.zeros(6, dtype=torch.float64))
    assert torch.equal(out["std"], torch.zeros(6, 3, dtype=torch.float64))


def test_probit_summary_of_a_gaussian_over_the_logits() -> None:
    mean, variance = _logits(2, 4, 3, seed=3), _logits(2, 4, 3, seed=4).abs()
    out = Categorical().summarize_gaussian(mean, variance)
    scaled = mean / torch.sqrt(1 + math.pi / 8 * variance)
    probs = scaled.exp() / scaled.exp().sum(dim=-1, keepdim=True)
    torch.testing.assert_close(out["mean"], probs.mean(dim=0))
    torch.testing.assert_close(out["std"], probs.std(dim=0, correction=0))
    expected = _expected(scaled)  # the same mixture summary of the probit-scaled logits
    torch.testing.assert_close(out["mutual_information"], expected["mutual_information"])


def test_shapes_it_cannot_read_are_refused() -> None:
    with pytest.raises(ValueError, match="class_dim=1"):
        Categorical().summarize([_logits(2, 3, 4, 5)])
    with pytest.raises(ValueError, match="task='binary'"):
        Categorical().summarize([_logits(2, 3)])
    with pytest.raises(ValueError, match="out of range"):
        Categorical(class_dim=3).summarize([_logits(2, 3, 4, 5)])
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match="class_dim must be None or a non-zero int"):
            Categorical(class_dim=bad)  # type: ignore[arg-type]


def test_probabilities_given_as_outputs_warn_once() -> None:
    likelihood = Categorical()
    probs = torch.softmax(_logits(2, 4, 3, seed=5), dim=-1)
    with pytest.warns(UserWarning, match="look like probabilities"):
        likelihood.check_outputs(probs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        likelihood.check_outputs(probs)  # the second batch is silent
        Categorical().check_outputs(_logits(2, 4, 3, seed=5))  # logits never warn


def test_held_out_score_and_test_metrics_skip_ignored_targets() -> None:
    likelihood = Categorical(class_dim=1, ignore_index=-1)
    logits = _logits(3, 2, 4, 5, seed=6)  # [S, B, C, T]
    targets = torch.randint(0, 4, (2, 5), generator=torch.Generator().manual_seed(7))
    targets[0, :2] = -1
    summary = likelihood.summarize([logits])
    probs = _expected(logits.movedim(2, -1))["mean"]  # [B, T, C]
    keep = targets != -1
    picked = probs[keep].gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    score, fitted = likelihood.held_out_score([summary], [targets])
    assert score == pytest.approx(float(-picked.log().mean()), rel=1e-9) and fitted == {}
    metrics = likelihood.test_metrics(summary)
    likelihood.update_test_metrics(metrics, summary, targets)
    accuracy = (probs[keep].argmax(dim=1) == targets[keep]).double().mean()
    assert float(metrics.logged["accuracy"].compute()) == pytest.approx(float(accuracy), abs=1e-6)
    assert float(metrics.logged["nll"].compute()) == pytest.approx(score, rel=1e-5)
    mutual = summary["mutual_information"][keep].mean()
    assert float(metrics.logged["mutual_information"].compute()) == pytest.approx(float(mutual), rel=1e-5)
    with pytest.raises(ValueError, match="Classification targets of shape"):
        likelihood.held_out_score([summary], [targets[:, :3]])
