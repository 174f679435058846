"""The MNIST experiment end to end in its ``--fast`` setting (real data when LIGHTNING_SWAG_DATA is set)."""

from __future__ import annotations

import json

import pytest
from synthetic_idx import example_data, write_synthetic_idx

from lightning_swag.experiments import mnist


@pytest.mark.slow
def test_mnist_example_fast(tmp_path) -> None:
    data_dir, extra = example_data(tmp_path, num_train=1200, num_test=400)
    out = tmp_path / "out"
    args = mnist.parse_args(["--fast", "--data-dir", data_dir, "--output-dir", str(out), *extra])
    table = mnist.run(args)
    assert list(table) == ["SGD", "SWA", "SWAG-Diagonal", "SWAG", "MultiSWAG (3 runs)"]
    saved = json.loads((out / "results.json").read_text())["methods"]
    for name, row in table.items():
        assert saved[name]["accuracy"] == pytest.approx(row["accuracy"])
        assert 0.5 < row["accuracy"] <= 1.0, name  # far above chance (0.1) after a few epochs
        assert row["nll"] > 0 and 0 <= row["ece"] <= 1 and 0 <= row["ood_auroc"] <= 1
    assert table["SGD"]["mutual_information"] == 0.0 and table["SWA"]["mutual_information"] == 0.0
    assert table["SWAG"]["mutual_information"] > 0
    assert "| SWAG |" in (out / "results.md").read_text()
    for figure in ("uncertain_digits.png", "reliability.png", "entropy_histograms.png"):
        assert (out / figure).stat().st_size > 10_000


@pytest.mark.slow
def test_parallel_runs_give_the_same_results(tmp_path) -> None:
    """--workers trains the MultiSWAG runs in spawned processes; the table must not change."""
    data_dir = str(tmp_path / "data")
    for dataset in ("MNIST", "FashionMNIST"):
        write_synthetic_idx(data_dir, dataset, num_train=600, num_test=200)
    common = ["--fast", "--data-dir", data_dir, "--subset", "600", "--test-subset", "200", "--runs", "2"]
    serial = mnist.run(mnist.parse_args([*common, "--output-dir", str(tmp_path / "serial")]))
    parallel = mnist.run(mnist.parse_args([*common, "--workers", "2", "--output-dir", str(tmp_path / "par")]))
    assert list(parallel) == list(serial)
    for name, row in serial.items():
        assert parallel[name] == pytest.approx(row, rel=1e-4, abs=1e-6), name


def test_tune_scale_picks_from_the_candidates_on_held_out_images(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    for dataset in ("MNIST", "FashionMNIST"):
        write_synthetic_idx(data_dir, dataset, num_train=600, num_test=200)
    with pytest.raises(SystemExit):
        mnist.parse_args(["--tune-scale", "0.5,1"])  # no --val-size: refused by the parser
    out = tmp_path / "out"
    args = mnist.parse_args(
        ["--fast", "--data-dir", data_dir, "--subset", "600", "--test-subset", "200", "--runs", "2"]
        + ["--val-size", "200", "--tune-scale", "0.25,1", "--no-figures", "--output-dir", str(out)]
    )
    mnist.run(args)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["tuned_scales"]) == {"SWAG-Diagonal", "SWAG", "MultiSWAG (2 runs)"}
    assert all(scale in (0.25, 1.0) for scale in saved["tuned_scales"].values())
    assert "scales tuned on 200 held-out training images" in saved["setting"]
    assert not (out / "reliability.png").exists()
