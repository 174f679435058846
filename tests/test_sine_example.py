"""The sine experiment end to end, in the reduced ``--fast`` setting."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_swag.experiments import sine
from lightning_swag.experiments.data import SineDataModule  # noqa: E402


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


@pytest.mark.slow
def test_sine_example_fast(tmp_path) -> None:
    metrics = sine.run(sine.parse_args(["--fast", "--output-dir", str(tmp_path)]))
    for name in ("swa", "swag_diagonal", "swag"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["swag"]["rmse_vs_true_function"] == pytest.approx(metrics["swag"]["rmse_vs_true_function"])
    assert saved["swa"]["mean_std_inside"] == 0.0  # one sample at scale 0
    for name in ("swag_diagonal", "swag"):
        assert saved[name]["mean_std_outside"] > saved[name]["mean_std_inside"] > 0
        # better than the constant 0 (RMSE of 3 sin x on [-5, 5] is about 2.1), even after 40 epochs
        assert saved[name]["rmse_vs_true_function"] < 2.0
