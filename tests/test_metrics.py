"""Metrics checked against hand-computed values and explicit loops (numpy / Python)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_swag.metrics import (
    UncertaintyMetrics,
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    mutual_information,
    nll,
    ood_auroc,
    predictive_entropy,
    reliability_curve,
)

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
TARGETS = torch.tensor([0, 1, 0, 2])


def random_probs(num_samples: int, num_classes: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(num_samples, num_classes, generator=generator), dim=-1)


def random_targets(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_classes, (num_samples,), generator=generator)


def loop_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """ECE by an explicit loop, binning like torchmetrics: [k/n, (k+1)/n), conf == 1 in its own bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1, dtype=np.float32)
    bins: dict[int, list[tuple[float, float]]] = {}
    for row, target in zip(probs, targets, strict=True):
        confidence = float(row.max())
        correct = float(int(row.argmax()) == int(target))
        index = n_bins if confidence >= 1.0 else int(np.searchsorted(edges, confidence, side="right")) - 1
        bins.setdefault(index, []).append((confidence, correct))
    total = len(targets)
    error = 0.0
    for members in bins.values():
        mean_confidence = sum(c for c, _ in members) / len(members)
        mean_accuracy = sum(a for _, a in members) / len(members)
        error += len(members) / total * abs(mean_accuracy - mean_confidence)
    return error


def loop_entropy(row: list[float]) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


# ------------------------------------------------------------------------------------ hand examples
def test_accuracy_hand_example() -> None:
    # argmax: 0, 1, 2, 0  vs targets 0, 1, 0, 2  -> 2 of 4
    assert accuracy(PROBS, TARGETS).item() == pytest.approx(0.5)


def test_nll_hand_example() -> None:
    expected = -(math.log(0.7) + math.log(0.8) + math.log(0.3) + math.log(0.25)) / 4
    assert nll(PROBS, TARGETS).item() == pytest.approx(expected, rel=1e-6)


def test_nll_clamps_zero_probability() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = nll(probs, torch.tensor([1, 0])).item()
    assert math.isfinite(value)
    assert value == pytest.approx((-math.log(1e-12) + math.log(2)) / 2, rel=1e-6)


def test_brier_hand_example() -> None:
    per_sample = [
        (0.7 - 1) ** 2 + 0.2**2 + 0.1**2,
        0.1**2 + (0.8 - 1) ** 2 + 0.1**2,
        (0.3 - 1) ** 2 + 0.3**2 + 0.4**2,
        0.5**2 + 0.25**2 + (0.25 - 1) ** 2,
    ]
    assert brier_score(PROBS, TARGETS).item() == pytest.approx(sum(per_sample) / 4, rel=1e-6)


def test_brier_extremes() -> None:
    targets = torch.tensor([0, 1])
    assert brier_score(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), targets).item() == pytest.approx(0.0)
    assert brier_score(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), targets).item() == pytest.approx(2.0)


def test_ece_hand_example() -> None:
    # 2 bins: confidences 0.7, 0.8 (bin 1, both correct) and 0.4, 0.5 (bins 0 and 1).
    # bin [0, 0.5): {0.4: wrong}            -> |0 - 0.4| * 1/4
    # bin [0.5, 1): {0.7 ok, 0.8 ok, 0.5 wrong} -> |2/3 - 2/3| * 3/4 = 0
    assert expected_calibration_error(PROBS, TARGETS, n_bins=2).item() == pytest.approx(0.1, abs=1e-6)


def test_entropy_hand_example() -> None:
    expected = torch.tensor([loop_entropy(row) for row in PROBS.tolist()])
    torch.testing.assert_close(predictive_entropy(PROBS), expected)
    uniform = torch.full((1, 10), 0.1)
    assert predictive_entropy(uniform).item() == pytest.approx(math.log(10), rel=1e-6)
    assert predictive_entropy(torch.tensor([[1.0, 0.0, 0.0]])).item() == 0.0


# ------------------------------------------------------------------------ random inputs vs loops
@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_explicit_binning_loop(n_bins: int) -> None:
    probs = random_probs(500, 10, seed=n_bins)
    targets = random_targets(500, 10, seed=100 + n_bins)
    expected = loop_ece(probs.numpy(), targets.numpy(), n_bins)
    assert expected_calibration_error(probs, targets, n_bins=n_bins).item() == pytest.approx(
        expected, abs=1e-5
    )


def test_ece_with_saturated_confidences() -> None:
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.96, 0.04], [0.6, 0.4]])
    targets = torch.tensor([0, 1, 0, 0])
    expected = loop_ece(probs.numpy(), targets.numpy(), 15)
    assert expected_calibration_error(probs, targets).item() == pytest.approx(expected, abs=1e-6)


def test_nll_and_brier_match_numpy() -> None:
    probs = random_probs(300, 7, seed=1)
    targets = random_targets(300, 7, seed=2)
    p, t = probs.double().numpy(), targets.numpy()
    expected_nll = -np.mean(np.log(p[np.arange(len(t)), t]))
    one_hot = np.eye(7)[t]
    expected_brier = np.mean(np.sum((p - one_hot) ** 2, axis=1))
    assert nll(probs, targets).item() == pytest.approx(expected_nll, rel=1e-5)
    assert brier_score(probs, targets).item() == pytest.approx(expected_brier, rel=1e-5)


def test_mutual_information_matches_loop_and_is_nonnegative() -> None:
    generator = torch.Generator().manual_seed(3)
    sample_probs = torch.softmax(2 * torch.randn(8, 50, 4, generator=generator), dim=-1)
    mi = mutual_information(sample_probs)
    assert mi.shape == (50,)
    assert bool((mi >= 0).all())
    for n in range(0, 50, 7):
        samples = sample_probs[:, n, :].double().tolist()
        mean_row = [sum(s[c] for s in samples) / len(samples) for c in range(4)]
        expected = loop_entropy(mean_row) - sum(loop_entropy(s) for s in samples) / len(samples)
        assert mi[n].item() == pytest.approx(expected, abs=1e-5)


def test_mutual_information_zero_when_samples_agree() -> None:
    probs = random_probs(20, 5, seed=4)
    sample_probs = probs.unsqueeze(0).expand(6, -1, -1)
    torch.testing.assert_close(mutual_information(sample_probs), torch.zeros(20), atol=1e-6, rtol=0)


def test_mutual_information_positive_when_samples_disagree() -> None:
    sample_probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident, opposite samples
    assert mutual_information(sample_probs).item() == pytest.approx(math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------------------ AUROC
def test_ood_auroc_perfect_separation() -> None:
    in_scores = torch.linspace(0.0, 1.0, 50)
    out_scores = torch.linspace(1.5, 30.0, 40)  # far outside [0, 1]: must not collapse to ties
    assert ood_auroc(in_scores, out_scores).item() == pytest.approx(1.0)
    assert ood_auroc(out_scores, in_scores).item() == pytest.approx(0.0)


def test_ood_auroc_large_scores_keep_their_order() -> None:
    # A sigmoid would map all of these to 1.0 in float32; ranks keep them apart.
    assert ood_auroc(torch.tensor([100.0, 101.0]), torch.tensor([200.0, 300.0])).item() == pytest.approx(1.0)


def test_ood_auroc_identical_distributions_near_half() -> None:
    generator = torch.Generator().manual_seed(5)
    in_scores = torch.rand(4000, generator=generator)
    out_scores = torch.rand(4000, generator=generator)
    assert ood_auroc(in_scores, out_scores).item() == pytest.approx(0.5, abs=0.03)


def test_ood_auroc_matches_pair_counting() -> None:
    in_scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    out_scores = torch.tensor([0.9, 0.4, 0.7])
    pairs = [
        1.0 if o > i else 0.5 if o == i else 0.0 for i in in_scores.tolist() for o in out_scores.tolist()
    ]
    assert ood_auroc(in_scores, out_scores).item() == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


# ------------------------------------------------------------------------------- reliability curve
def test_reliability_curve_bins() -> None:
    curve = reliability_curve(PROBS, TARGETS, n_bins=2)
    torch.testing.assert_close(curve.bin_edges, torch.tensor([0.0, 0.5, 1.0]))
    assert curve.count.tolist() == [1, 3]
    torch.testing.assert_close(curve.confidence, torch.tensor([0.4, (0.7 + 0.8 + 0.5) / 3]))
    torch.testing.assert_close(curve.accuracy, torch.tensor([0.0, 2 / 3]))


def test_reliability_curve_empty_bins_are_nan_and_one_goes_in_last_bin() -> None:
    curve = reliability_curve(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), n_bins=4)
    assert curve.count.tolist() == [0, 0, 0, 2]
    assert torch.isnan(curve.confidence[:3]).all() and torch.isnan(curve.accuracy[:3]).all()
    assert curve.accuracy[3].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- summary and Metric
def test_classification_metrics_dict() -> None:
    metrics = classification_metrics(PROBS, TARGETS)
    assert set(metrics) == {"accuracy", "nll", "brier", "ece", "entropy"}
    assert all(isinstance(value, float) for value in metrics.values())
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["entropy"] == pytest.approx(predictive_entropy(PROBS).mean().item())


def test_uncertainty_metrics_accumulates_like_the_functional_version() -> None:
    probs = random_probs(1000, 10, seed=6, sharpness=6.0)
    probs[:50] = torch.nn.functional.one_hot(torch.arange(50) % 10, 10).float()  # saturated: conf == 1
    targets = random_targets(1000, 10, seed=7)
    targets[:25] = torch.arange(25) % 10  # half of the saturated ones are right
    metric = UncertaintyMetrics(num_classes=10)
    for batch in range(0, 1000, 128):
        metric.update(probs[batch : batch + 128], targets[batch : batch + 128])
    accumulated = {key: value.item() for key, value in metric.compute().items()}
    expected = classification_metrics(probs, targets)
    assert accumulated == pytest.approx(expected, abs=1e-5)
    metric.reset()
    metric.update(probs[:10], targets[:10])
    assert metric.compute()["accuracy"].item() == pytest.approx(accuracy(probs[:10], targets[:10]).item())


# ------------------------------------------------------------------------------------ validation
def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4,\).*\(3, 3\)"):
        nll(PROBS[:3], TARGETS)
    with pytest.raises(ValueError, match=r"\[N, C\].*\(3,\)"):
        brier_score(torch.ones(3) / 3, TARGETS[:3])
    with pytest.raises(ValueError, match=r"\[S, N, C\]"):
        mutual_information(PROBS)
    with pytest.raises(ValueError, match="1-D"):
        ood_auroc(torch.zeros(2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[B, 10\].*\(4, 3\)"):
        UncertaintyMetrics(num_classes=10).update(PROBS, TARGETS)


def test_logits_and_bad_targets_are_rejected() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    with pytest.raises(ValueError, match="softmax"):
        accuracy(logits, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        nll(PROBS, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="integer"):
        nll(PROBS, TARGETS.float())


def test_uncertainty_metrics_in_a_lightning_test_loop() -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    inputs = torch.randn(96, 4, generator=torch.Generator().manual_seed(8))
    targets = random_targets(96, 3, seed=9)

    class TinyClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 3)
            self.test_metrics = UncertaintyMetrics(num_classes=3)

        def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            x, y = batch
            self.test_metrics.update(torch.softmax(self.net(x), dim=-1), y)

        def on_test_epoch_end(self) -> None:
            self.log_dict({f"test_{key}": value for key, value in self.test_metrics.compute().items()})
            self.test_metrics.reset()

    model = TinyClassifier()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (logged,) = trainer.test(model, DataLoader(TensorDataset(inputs, targets), batch_size=32), verbose=False)
    with torch.no_grad():
        expected = classification_metrics(torch.softmax(model.net(inputs), dim=-1), targets)
    assert {key.removeprefix("test_"): value for key, value in logged.items()} == pytest.approx(
        expected, abs=1e-5
    )


def _nll_at(logits: torch.Tensor, targets: torch.Tensor, t: float) -> float:
    """The NLL of softmax(logits / t) by an explicit log-sum-exp per row (numpy, float64)."""
    z = logits.double().numpy() / t
    log_norm = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    return float(np.mean(log_norm - z[np.arange(len(z)), targets.numpy()]))


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_finds_the_minimum_of_the_nll(true_t) -> None:
    """Labels drawn from softmax(z / true_t): the fitted T is the NLL's minimiser on a dense grid and
    near true_t (a calibrated model's temperature)."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 5, generator=generator)
    targets = torch.multinomial(torch.softmax(logits / true_t, dim=-1), 1, generator=generator).squeeze(1)
    t = fit_temperature(logits, targets)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    values = [_nll_at(logits, targets, g) for g in grid]
    best = int(np.argmin(values))
    assert grid[best - 1] <= t <= grid[best + 1]
    assert _nll_at(logits, targets, t) <= min(values) + 1e-12
    assert t == pytest.approx(true_t, rel=0.1)
    assert fit_temperature(logits, targets) == t  # deterministic


def test_fit_temperature_warns_at_the_edge_and_refuses_bad_input() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    with pytest.warns(UserWarning, match="widen the bounds"):
        t = fit_temperature(logits, torch.tensor([0, 1]))  # classified perfectly: T -> 0
    assert t == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(logits, torch.tensor([0, 1]), bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(logits.long(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must lie"):
        fit_temperature(logits, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
