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
from lightning_swag.metrics import regression_metrics


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


# ------------------------------------------------------------------------------------ splits
def test_holdout_splits_every_row_once() -> None:
    kept, held_out = regression.holdout(50, 0.2, seed=3)
    assert len(held_out) == 10 and len(kept) == 40
    assert sorted(torch.cat([kept, held_out]).tolist()) == list(range(50))
    again = regression.holdout(50, 0.2, seed=3)
    assert torch.equal(again[0], kept) and torch.equal(again[1], held_out)


def _row_ids(data: dict[str, torch.Tensor]) -> dict[str, set[int]]:
    """Row ids 0..441 of each part, from targets ``y = id`` standardised by one affine map."""
    pooled = torch.cat([data["y_train"], data["y_val"], data["y_test"]]).double()
    low, high = float(pooled.min()), float(pooled.max())
    return {
        part: set(torch.round((data[f"y_{part}"].double() - low) / (high - low) * 441).long().tolist())
        for part in ("train", "val", "test")
    }


def test_diabetes_split_holds_validation_out_of_the_training_part() -> None:
    x = torch.randn(442, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(442, dtype=torch.float32)
    data = regression.diabetes_split(x, y, split=1, val_fraction=0.2)
    ids = _row_ids(data)
    assert [len(ids[part]) for part in ("train", "val", "test")] == [318, 80, 44]
    assert ids["train"] | ids["val"] | ids["test"] == set(range(442))  # each row in exactly one part
    # Standardised with the statistics of the rows trained on (validation and test rows excluded).
    assert float(data["y_train"].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(data["y_train"].std()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(data["x_train"].mean(0), torch.zeros(10), atol=1e-5)
    assert torch.allclose(data["x_train"].std(0), torch.ones(10), atol=1e-5)
    expected_x_val = (x[sorted(ids["val"])] - x[sorted(ids["train"])].mean(0)) / x[sorted(ids["train"])].std(
        0
    )
    order = torch.argsort(data["y_val"])  # validation rows in id order
    assert torch.allclose(data["x_val"][order], expected_x_val, atol=1e-5)
    # The validation fraction changes the training rows, never the test rows of a split.
    assert _row_ids(regression.diabetes_split(x, y, split=1, val_fraction=0.3))["test"] == ids["test"]
    assert _row_ids(regression.diabetes_split(x, y, split=2))["test"] != ids["test"]


# ------------------------------------------------------------------------------------ methods
@pytest.fixture(scope="module")
def two_runs() -> tuple[list[regression.Run], dict[str, torch.Tensor]]:
    """Two short runs on 160 heteroscedastic sine points, with 40 validation points held out."""
    torch.set_num_threads(1)
    dm = SineDataModule(noise="heteroscedastic", num_points=200)
    kept, held_out = regression.holdout(200, 0.2, seed=0)
    data = {
        "x_train": dm.x[kept],
        "y_train": dm.y[kept].reshape(-1),
        "x_val": dm.x[held_out],
        "y_val": dm.y[held_out].reshape(-1),
    }
    configs = [
        regression.TrainConfig(
            in_features=1,
            hidden=[16],
            lr=1e-2,
            weight_decay=0.0,
            pretrain_epochs=8,
            collect_epochs=6,
            batch_size=32,
            max_rank=5,
            seed=seed,
        )
        for seed in (0, 1)
    ]
    return [regression.train_map_and_swag(c, data["x_train"], data["y_train"]) for c in configs], data


def test_predictors_tune_on_validation_and_score_with_trainer_test(two_runs) -> None:
    runs, data = two_runs
    predictors = regression.swag_predictors(runs, num_samples=8, seed=0)
    assert set(predictors) == {"swa", "swag_diagonal", "swag", "multiswag"}
    assert len(predictors["multiswag"].posteriors) == 2
    candidates = [0.25, 1.0, 4.0]
    chosen = regression.tune_scales(predictors, data["x_val"], data["y_val"], candidates)
    assert set(chosen) == {"swag_diagonal", "swag", "multiswag"}
    assert predictors["swa"].scale == 0.0 and predictors["swa"].num_samples == 1  # SWA is not tuned
    for name, scale in chosen.items():
        assert scale in candidates and predictors[name].scale == scale

    x_test = torch.linspace(-5, 5, 64).unsqueeze(1)
    y_test = SineDataModule(noise="heteroscedastic").sample_targets(x_test, seed=5).reshape(-1)
    for name in ("swag", "multiswag"):
        predictive = regression.swag_predictive(predictors[name], x_test)
        samples, variances = predictive["samples"], predictive["sample_variances"]
        assert samples.shape == variances.shape == (8 * len(predictors[name].posteriors), 64)
        expected = regression_metrics(samples, variances, y_test)  # the explicit computation
        logged = regression.swag_test_metrics(predictors[name], x_test, y_test)
        assert logged == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert torch.allclose(
            predictive["std"].square(),
            predictive["epistemic_std"].square() + predictive["aleatoric_std"].square(),
        )


def test_map_and_ensemble_predictives_are_the_networks_own_gaussians(two_runs) -> None:
    runs, _ = two_runs
    x = torch.linspace(-6, 6, 20).unsqueeze(1)
    ensemble = regression.map_predictive([run.map_model for run in runs], x)
    assert ensemble["samples"].shape == (2, 20)
    for i, run in enumerate(runs):
        with torch.no_grad():
            out = run.map_model(x)
        assert torch.equal(ensemble["samples"][i], out[:, 0])
        assert torch.allclose(ensemble["sample_variances"][i], out[:, 1].exp())
    single = regression.map_predictive([runs[0].map_model], x)
    assert float(single["epistemic_std"].abs().max()) == 0.0
    assert torch.allclose(single["std"], single["sample_variances"][0].sqrt())


# ------------------------------------------------------------------------------------ example
@pytest.mark.slow
def test_regression_example_fast(tmp_path) -> None:
    figures = tmp_path / "figures"
    args = regression.parse_args(["--fast", "--output-dir", str(tmp_path), "--figures-dir", str(figures)])
    results = regression.run(args)
    for name in ("regression_sine_intervals.png", "regression_sine_std.png", "regression_calibration.png"):
        assert (figures / name).stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert "| SWAG |" in markdown and "Goals (sine)" in markdown and saved["machine"] in markdown
    sine = saved["sine"]
    assert sine["table"]["swag"]["nll"][0] == pytest.approx(results["sine"]["table"]["swag"]["nll"][0])
    for chosen in sine["scales"]:  # tuned on the validation points, one scale per SWAG method
        assert set(chosen) == {"swag_diagonal", "swag"}
        assert set(chosen.values()) <= set(args.sine_scales)

    # The band widens with the noise inside the data (aleatoric) ...
    swag = sine["regions"]["swag"]
    center, edge, far = swag["|x|≤1"], swag["4≤|x|≤5"], swag["8≤|x|≤10"]
    true_ratio = 0.37 / 0.13  # mean true σ(x) on 4 ≤ |x| ≤ 5 over |x| ≤ 1
    assert edge["std"] > 0.6 * true_ratio * center["std"]
    assert edge["aleatoric_std"] / center["aleatoric_std"] == pytest.approx(true_ratio, rel=0.4)
    # ... and grows again outside it, where the weight samples disagree (epistemic).
    assert far["std"] > edge["std"]
    assert far["epistemic_std"] > 1.5 * edge["epistemic_std"] > 3 * center["epistemic_std"] > 0
    assert sine["regions"]["map"]["8≤|x|≤10"]["epistemic_std"] == 0.0

    # In-distribution: SWAG beats the MAP network's own predictive, 90% intervals near nominal.
    table = sine["table"]
    assert table["swag"]["nll"][0] < table["map"]["nll"][0]
    assert 0.8 < table["swag"]["coverage_90"][0] < 0.97

    if "diabetes" in saved:  # scikit-learn installed
        diabetes = saved["diabetes"]
        assert len(diabetes["runs"]) == len(diabetes["scales"]) == 2 and diabetes["runs_per_split"] == 2
        for method in ("map", "ensemble", "swag", "swag_diagonal", "multiswag"):
            row = diabetes["table"][method]
            assert 0.9 < row["nll"][0] < 1.4  # standardised targets: N(0, 1) scores 1.42
            assert 0.6 < row["rmse"][0] < 0.9


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
    assert (tmp_path / "regression_calibration.png").exists()  # figures go to --output-dir by default


@pytest.mark.parametrize(
    "argv",
    [
        ["--experiments", "sine,boston"],
        ["--sine-scales", "0,0.5"],  # scale 0 is the SWA row, not a SWAG candidate
        ["--diabetes-scales", "a,b"],
        ["--val-fraction", "1"],
        ["--runs", "0"],
    ],
)
def test_parse_args_rejects_bad_options(argv) -> None:
    with pytest.raises(SystemExit):
        regression.parse_args(argv)


def test_parse_args_reads_the_per_experiment_options() -> None:
    args = regression.parse_args(["--diabetes-scales", "0.5, 2", "--sine-weight-decay", "0.01"])
    assert args.diabetes_scales == [0.5, 2.0] and args.sine_scales[0] == 0.125
    config = regression.train_config(args, "sine", in_features=1, seed=4)
    assert config.weight_decay == 0.01 and list(config.hidden) == [50, 50] and config.seed == 4
    assert regression.train_config(args, "diabetes", in_features=10, seed=0).weight_decay == 0.1
