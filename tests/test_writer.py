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
