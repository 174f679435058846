"""``benchmarks/mnist_quality.py`` end to end at a tiny budget, on synthetic MNIST-shaped data."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from benchmark_script import benchmark_script
from synthetic_idx import write_synthetic_idx


@pytest.fixture(scope="module")
def quality():
    with benchmark_script("mnist_quality") as module:
        yield module


def _tiny_run(quality, root: Path, seeds: str, json_path: Path | None = None) -> dict:
    """``main`` on 600 synthetic training and 200 test images, one epoch per phase, 3 samples."""
    data = root / "data"
    write_synthetic_idx(data, "MNIST", num_train=600, num_test=200, seed=0)
    write_synthetic_idx(data, "FashionMNIST", num_train=600, num_test=200, seed=1)
    argv = ["--data-dir", str(data), "--small", "--seeds", seeds, "--pretrain-epochs", "1"]
    argv += ["--collect-epochs", "1", "--num-samples", "3"]
    return quality.main(argv + (["--json", str(json_path)] if json_path else []))


def test_every_method_gets_a_sane_row(quality, tmp_path, capsys) -> None:
    results = _tiny_run(quality, tmp_path, "0,1", tmp_path / "results.json")

    expected = list(quality.METHODS)
    if importlib.util.find_spec("laplace") is None:
        expected.remove(quality.LAPLACE)
    assert sorted(results) == [0, 1]
    for table in results.values():
        assert list(table) == expected
        for name, row in table.items():
            assert 0.0 <= row["accuracy"] <= 1.0, name
            assert math.isfinite(row["nll"]) and row["nll"] > 0, name
            assert 0.0 <= row["ece"] <= 1.0 and 0.0 <= row["ood_auroc"] <= 1.0, name
    printed = capsys.readouterr().out
    for name in expected:
        assert f"| {name} |" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["0"]["SGD"]["accuracy"] == results[0]["SGD"]["accuracy"]


def test_without_laplace_torch_its_row_is_skipped(quality, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "laplace", None)  # makes ``from laplace import ...`` fail
    results = _tiny_run(quality, tmp_path, "0")
    assert quality.LAPLACE not in results[0] and len(results[0]) == len(quality.METHODS) - 1
    printed = capsys.readouterr().out
    assert "laplace-torch is not installed" in printed and quality.LAPLACE not in printed
