"""The prediction files: the renamed meta field, and files written before the rename."""

from __future__ import annotations

import json

import numpy as np
import torch

from lightning_swag import load_predictions


def test_files_written_with_the_old_meta_field_load_with_the_new_name(tmp_path) -> None:
    old = {"mean": torch.zeros(3, 2), "meta": {"task": "regression", "num_samples": 30, "num_rows": 3}}
    torch.save(old, tmp_path / "old.pt")
    np.savez(tmp_path / "old.npz", mean=np.zeros((3, 2)), meta=np.array(json.dumps(old["meta"])))
    for name in ("old.pt", "old.npz"):
        meta = load_predictions(tmp_path / name)["meta"]
        assert meta["total_samples"] == 30 and "num_samples" not in meta
        assert meta["task"] == "regression" and meta["num_rows"] == 3


def test_new_files_keep_the_field_as_written(tmp_path) -> None:
    new = {"mean": torch.zeros(1), "meta": {"total_samples": 60}}
    torch.save(new, tmp_path / "new.pt")
    assert load_predictions(tmp_path / "new.pt")["meta"] == {"total_samples": 60}


def _write(tmp_path, **options) -> dict:
    import lightning as L
    from conftest import QUIET, random_walk_posterior
    from torch import nn
    from torch.utils.data import DataLoader

    from lightning_swag import SWAGModule, SWAGPredictionWriter

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    bma = SWAGModule(net, random_walk_posterior(net), task="classification", seed=0, **options)
    writer = SWAGPredictionWriter(output_dir=str(tmp_path), filename="p.npz")
    L.Trainer(**QUIET, callbacks=[writer]).predict(bma, DataLoader(torch.randn(6, 4), batch_size=3))
    return load_predictions(tmp_path / "p.npz")["meta"]


def test_a_linearized_run_records_its_predictive_and_its_weight_samples(tmp_path) -> None:
    meta = _write(tmp_path / "probit", predictive="linearized", num_samples=200)
    assert meta["predictive"] == "linearized" and meta["link_approx"] == "probit"
    assert meta["total_samples"] == 0  # the closed form draws no weight samples
    assert meta["num_rows"] == 6
    meta = _write(tmp_path / "mc", predictive="linearized", link_approx="mc", num_samples=200)
    assert meta["link_approx"] == "mc"
    assert meta["total_samples"] == 200  # the linearised outputs under 200 weight samples


def test_a_sampled_run_records_its_weight_samples(tmp_path) -> None:
    meta = _write(tmp_path, num_samples=7)
    assert meta["predictive"] == "sampled" and meta["link_approx"] is None
    assert meta["total_samples"] == 7
