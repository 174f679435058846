"""The sine experiment end to end, in the reduced ``--fast`` setting."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_swag.experiments import sine
from lightning_swag.experiments.data import SineDataModule  # noqa: E402
from lightning_swag.experiments.plots import plot_regression


def test_sine_data_matches_the_notebook() -> None:
    dm = SineDataModule()
    torch.manual_seed(1355)  # the notebook's global seeding, reproduced here independently
    x = torch.linspace(-5, 5, 500).unsqueeze(1)
    y = 3 * torch.sin(x) + torch.randn(x.size()) * (0.7 + 2 * torch.sin(0.2 * x))
    assert torch.equal(dm.x, x) and torch.equal(dm.y, y)
    assert dm.batch_size == 16


def test_sine_data_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SineDataModule(batch_size=0)
    with pytest.raises(ValueError, match="low < high"):
        SineDataModule(low=1.0, high=-1.0)


def _strict_json(text: str):
    """``json.loads`` that rejects NaN and ±Infinity, as strict JSON readers do."""

    def reject(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def test_strict_json_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _strict_json('{"ratio": NaN}')


def test_regression_figure_labels_and_legend_placement() -> None:
    x = torch.linspace(-10, 10, 50).unsqueeze(1)
    samples = torch.stack([torch.sin(x) + 0.1 * i for i in range(7)])
    fig = plot_regression(
        x[10:40],
        torch.sin(x[10:40]),
        x,
        samples.mean(0),
        samples.std(0),
        samples=samples,
        max_curves=3,
        title="t",
        true_function=(x, torch.sin(x)),
        data_range=(-5.0, 5.0),
    )
    left, right = fig.axes
    assert left.get_ylabel() and left.get_xlabel() == right.get_xlabel() == "x"
    assert left.get_legend() is None and right.get_legend() is None  # one legend, outside the panels
    (legend,) = fig.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert "sampled predictions (3 of 7 drawn)" in labels  # evenly spaced: samples 0, 3, 6
    assert {"observations", "3 sin x", "no training data", "BMA mean", "± 1 std"} <= set(labels)
    fig.canvas.draw()
    legend_box = legend.get_window_extent()
    assert all(legend_box.y1 <= ax.get_window_extent().y0 for ax in fig.axes)  # below both panels


@pytest.mark.slow
def test_sine_example_fast(tmp_path) -> None:
    metrics = sine.run(sine.parse_args(["--fast", "--output-dir", str(tmp_path)]))
    for name in ("swa", "swag_diagonal", "swag", "multiswag"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    saved = _strict_json((tmp_path / "metrics.json").read_text())  # no NaN: strict JSON
    assert saved["swag"]["rmse_vs_true_function"] == pytest.approx(metrics["swag"]["rmse_vs_true_function"])
    assert saved["swa"]["mean_std_inside"] == 0.0  # one sample at scale 0
    assert saved["swa"]["std_ratio_outside_inside"] is None  # 0/0: undefined, and the notes say why
    assert "0/0" in saved["notes"]["std_ratio_outside_inside"]
    assert saved["run"]["runs"] == 3 and saved["run"]["machine"]
    for name in ("swag_diagonal", "swag", "multiswag"):
        assert saved[name]["mean_std_outside"] > saved[name]["mean_std_inside"] > 0
        # better than the constant 0 (RMSE of 3 sin x on [-5, 5] is about 2.1), even after 40 epochs
        assert saved[name]["rmse_vs_true_function"] < 2.0
        outside = (
            saved[name]["mean_std_left"] + saved[name]["mean_std_right"]
        ) / 2  # as many points each side
        assert saved[name]["mean_std_outside"] == pytest.approx(outside, rel=1e-5)
    # the runs disagree on both sides of the data, so MultiSWAG's spread grows on both
    multi = saved["multiswag"]
    assert min(multi["mean_std_left"], multi["mean_std_right"]) > multi["mean_std_inside"]


def test_sine_runs_argument() -> None:
    assert sine.parse_args([]).runs == 3
    with pytest.raises(SystemExit):
        sine.parse_args(["--runs", "0"])
