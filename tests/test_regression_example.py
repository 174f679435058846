"""Regression with a noise model: the heteroscedastic data, the Gaussian regressor, and the
regression example end to end in its reduced ``--fast`` setting."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from conftest import QUIET
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag.experiments import regression
from lightning_swag.experiments.data import SineDataModule
from lightning_swag.experiments.data.sine import noise_std
from lightning_swag.experiments.models import GaussianRegressor, gaussian_nll_from_log_variance


# ------------------------------------------------------------------------------------ data
def test_heteroscedastic_sine_data_is_the_formula() -> None:
    dm = SineDataModule(noise="heteroscedastic")
    generator = torch.Generator().manual_seed(1355)
    x = torch.linspace(-5, 5, 500).unsqueeze(1)
    y = 3 * torch.sin(x) + torch.randn(x.size(), generator=generator) * (0.1 + 0.3 * x.abs() / 5)
    assert torch.equal(dm.x, x) and torch.equal(dm.y, y)
    assert torch.allclose(noise_std(x, "heteroscedastic"), 0.1 + 0.06 * x.abs())
    # The default keeps the notebook's noise (its exact data is checked in test_sine_example.py).
    assert torch.equal(SineDataModule().x, x) and not torch.equal(SineDataModule().y, y)
    assert torch.allclose(noise_std(x), (0.7 + 2 * torch.sin(0.2 * x)).abs())


def test_heteroscedastic_noise_grows_with_distance() -> None:
    dm = SineDataModule(noise="heteroscedastic", num_points=20_000)
    residual = (dm.y - 3 * torch.sin(dm.x)).squeeze(1)
    distance = dm.x.squeeze(1).abs()
    for low, high in ((0.0, 1.0), (4.0, 5.0)):
        inside = (distance >= low) & (distance <= high)
        expected = math.sqrt(float(noise_std(dm.x.squeeze(1)[inside], "heteroscedastic").square().mean()))
        # The sample std of n Gaussian draws has a relative standard error of about 1/sqrt(2n).
        assert float(residual[inside].std()) == pytest.approx(
            expected, rel=4 / math.sqrt(2 * int(inside.sum()))
        )


def test_sample_targets_are_fresh_and_reproducible() -> None:
    dm = SineDataModule(noise="heteroscedastic")
    x = torch.linspace(-5, 5, 50).unsqueeze(1)
    assert torch.equal(dm.sample_targets(x, seed=3), dm.sample_targets(x, seed=3))
    assert not torch.equal(dm.sample_targets(x, seed=3), dm.sample_targets(x, seed=4))


def test_sine_noise_option_is_validated() -> None:
    with pytest.raises(ValueError, match="noise"):
        SineDataModule(noise="gaussian")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ model
def test_gaussian_regressor_outputs_mean_and_log_variance() -> None:
    torch.manual_seed(0)
    model = GaussianRegressor(in_features=3, hidden=[8, 8], init_log_variance=-1.0)
    x = torch.randn(5, 3)
    assert model(x).shape == (5, 2)
    assert GaussianRegressor.task == "regression" and GaussianRegressor.noise == "heteroscedastic"
    assert float(model.net[-1].bias[1]) == -1.0


def test_gaussian_nll_equals_torch_gaussian_nll_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    outputs = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    targets = torch.randn(16, 1, generator=generator, dtype=torch.float64)
    ours = gaussian_nll_from_log_variance(outputs, targets)
    reference = torch.nn.GaussianNLLLoss(full=True, eps=0.0)(
        outputs[:, 0], targets[:, 0], outputs[:, 1].exp()
    )
    assert float(ours) == pytest.approx(float(reference), rel=1e-12)
    with pytest.raises(ValueError, match="one value per predicted mean"):
        gaussian_nll_from_log_variance(outputs, targets[:3])


def test_gaussian_regressor_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="hidden"):
        GaussianRegressor(hidden=[])
    with pytest.raises(ValueError, match="activation"):
        GaussianRegressor(activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_schedule"):
        GaussianRegressor(lr_schedule="step")  # type: ignore[arg-type]


def test_cosine_schedule_anneals_to_a_hundredth() -> None:
    lrs: list[float] = []

    class Recorder(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    torch.manual_seed(0)
    model = GaussianRegressor(lr=0.01, lr_schedule="cosine")
    loader = DataLoader(TensorDataset(torch.randn(32, 1), torch.randn(32, 1)), batch_size=16)
    L.Trainer(max_epochs=4, callbacks=[Recorder()], **QUIET).fit(model, loader)
    expected = [0.0001 + (0.01 - 0.0001) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------ example
@pytest.mark.slow
def test_regression_example_fast(tmp_path) -> None:
    results = regression.run(regression.parse_args(["--fast", "--output-dir", str(tmp_path)]))
    for name in ("sine_intervals.png", "sine_std.png", "calibration.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "SWAG" in (tmp_path / "results.md").read_text()
    sine = saved["sine"]
    assert sine["table"]["swag"]["nll"][0] == pytest.approx(results["sine"]["table"]["swag"]["nll"][0])

    # The band widens with the noise inside the data (aleatoric) ...
    swag = sine["regions"]["swag"]
    center, edge, far = swag["|x|≤1"], swag["4≤|x|≤5"], swag["8≤|x|≤10"]
    true_ratio = 0.37 / 0.13  # mean true σ(x) on 4 ≤ |x| ≤ 5 over |x| ≤ 1
    assert edge["std"] > 0.6 * true_ratio * center["std"]
    assert edge["aleatoric_std"] / center["aleatoric_std"] == pytest.approx(true_ratio, rel=0.4)
    # ... and grows again outside it, where the weight samples disagree (epistemic).
    assert far["std"] > edge["std"]
    assert far["epistemic_std"] > 2 * edge["epistemic_std"] > 2 * center["epistemic_std"]
    assert sine["regions"]["map"]["8≤|x|≤10"]["epistemic_std"] == 0.0

    # In-distribution: SWAG beats the MAP network's own predictive, 90% intervals near nominal.
    table = sine["table"]
    assert table["swag"]["nll"][0] < table["map"]["nll"][0]
    assert 0.8 < table["swag"]["coverage_90"][0] < 0.97

    if "diabetes" in saved:  # scikit-learn installed
        diabetes = saved["diabetes"]["table"]
        assert len(saved["diabetes"]["runs"]) == 2
        for method in ("map", "swag", "swag_diagonal"):
            assert 0.9 < diabetes[method]["nll"][0] < 1.4  # standardised targets: N(0, 1) scores 1.42
            assert 0.6 < diabetes[method]["rmse"][0] < 0.9


def test_regression_example_without_optional_packages(tmp_path, monkeypatch, capsys) -> None:
    """Without laplace-torch and scikit-learn the example says so and runs the rest."""
    monkeypatch.setattr(regression, "_laplace_available", lambda: False)

    def no_sklearn():
        raise ImportError("No module named 'sklearn'")

    monkeypatch.setattr(regression, "load_diabetes_tensors", no_sklearn)
    args = regression.parse_args(
        [
            "--output-dir",
            str(tmp_path),
            "--seeds",
            "0",
            "--sine-pretrain-epochs",
            "3",
            "--sine-collect-epochs",
            "2",
            "--num-samples",
            "4",
        ]
    )
    results = regression.run(args)
    out = capsys.readouterr().out
    assert "laplace-torch is not installed" in out and "skipping the last-layer Laplace" in out
    assert "scikit-learn is not installed" in out
    assert "diabetes" not in results and "lla" not in results["sine"]["table"]
    assert set(results["sine"]["table"]) == {"map", "swa", "swag_diagonal", "swag"}


def test_parse_args_rejects_unknown_experiments() -> None:
    with pytest.raises(SystemExit):
        regression.parse_args(["--experiments", "sine,boston"])
