"""The shift benchmark (``lightning_swag.experiments.shift``): the shifted sets against independent
constructions, the metrics per shift against explicit computations, the seed summary and the goal
verdicts on hand-made numbers, and ``examples/shift.py --fast`` end to end."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_idx import example_data
from torch import nn

from lightning_swag import metrics
from lightning_swag.experiments import shift, shift_report
from lightning_swag.experiments.data.mnist import MNIST_MEAN, MNIST_STD
from lightning_swag.experiments.data.shift import corrupt

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = [
    "clean",
    *(f"rot-{a}" for a in range(15, 181, 15)),
    *(f"{k}-{s}" for k in ("noise", "blur", "contrast") for s in range(1, 6)),
]


def normalised_digits(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    pixels = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
    pixels[:, :, 5:23, 12:16] = 0.9
    return (pixels - MNIST_MEAN) / MNIST_STD


def test_the_shifted_sets_are_the_generators_applied_to_the_pixels() -> None:
    images = normalised_digits()
    pixels = images * MNIST_STD + MNIST_MEAN
    sets = dict(shift.shifted_sets(images, seed=3))
    assert list(sets) == SHIFTS
    assert sets["clean"] is images
    quarter = (torch.rot90(pixels, 1, dims=(2, 3)) - MNIST_MEAN) / MNIST_STD  # exact, counter-clockwise
    torch.testing.assert_close(sets["rot-90"], quarter, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        sets["noise-3"], (corrupt(pixels, "noise", 3, seed=3) - MNIST_MEAN) / MNIST_STD
    )
    again = dict(shift.shifted_sets(images, seed=3))
    other = dict(shift.shifted_sets(images, seed=4))
    assert torch.equal(again["noise-5"], sets["noise-5"]) and not torch.equal(
        other["noise-5"], sets["noise-5"]
    )


def test_uniform_noise_images_are_seeded_uniform_pixels() -> None:
    a, b = shift.uniform_noise_images(500, seed=0), shift.uniform_noise_images(500, seed=0)
    assert torch.equal(a, b) and not torch.equal(a, shift.uniform_noise_images(500, seed=1))
    pixels = a * MNIST_STD + MNIST_MEAN
    assert a.shape == (500, 1, 28, 28) and float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    assert float(pixels.mean()) == pytest.approx(0.5, abs=0.01)


def test_evaluate_gives_the_metrics_of_each_shifted_set_and_the_ood_aurocs() -> None:
    """Two fixed linear classifiers; every number is recomputed from the shifted images directly."""
    torch.manual_seed(0)
    nets = {
        "a": nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
        "b": nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
    }
    methods = {name: (lambda x, net=net: torch.softmax(net(x), dim=-1)) for name, net in nets.items()}
    images, labels = normalised_digits(40), torch.arange(40) % 10
    ood = {"fashion_mnist": torch.randn(30, 1, 28, 28), "uniform_noise": shift.uniform_noise_images(20, 0)}
    table = shift.evaluate(methods, images, labels, ood, seed=2)
    sets = dict(shift.shifted_sets(images, seed=2))
    with torch.no_grad():
        for name, method in methods.items():
            assert set(table[name]) == {*SHIFTS, "ood_auroc", "ood_auroc_entropy"}
            for key in ("clean", "rot-45", "blur-2", "contrast-5"):
                expected = metrics.classification_metrics(method(sets[key]), labels)
                assert table[name][key] == pytest.approx({k: expected[k] for k in shift.SHIFT_METRICS})
            clean = method(images)
            for ood_name, ood_images in ood.items():
                out = method(ood_images)
                msp = metrics.ood_auroc(1 - clean.max(dim=-1).values, 1 - out.max(dim=-1).values)
                assert table[name]["ood_auroc"][ood_name] == pytest.approx(float(msp))


def test_aggregate_is_the_mean_and_sample_std_over_seeds() -> None:
    per_seed = {
        0: {"m": {"clean": {"nll": 1.0}}},
        1: {"m": {"clean": {"nll": 2.0}}},
        2: {"m": {"clean": {"nll": 4.0}}},
    }
    mean, std = shift.aggregate(per_seed)
    assert mean["m"]["clean"]["nll"] == pytest.approx(7 / 3)
    assert std["m"]["clean"]["nll"] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    mean, std = shift.aggregate({0: per_seed[0]})
    assert mean == per_seed[0] and std["m"]["clean"]["nll"] == 0.0


def _result(nll: dict[str, float], ece: dict[str, float], seeds: int = 2) -> dict:
    """A result whose numbers are the same in every seed: ``nll[method]`` at every shift."""
    table = {
        m: {
            **{s: {"accuracy": 0.5, "nll": nll[m], "ece": ece[m], "brier": 0.5} for s in SHIFTS},
            "ood_auroc": {"fashion_mnist": 0.8, "uniform_noise": 0.9},
            "ood_auroc_entropy": {"fashion_mnist": 0.8, "uniform_noise": 0.9},
        }
        for m in nll
    }
    per_seed = {seed: json.loads(json.dumps(table)) for seed in range(seeds)}
    mean, std = shift.aggregate(per_seed)
    fitted = {seed: {"skipped": {}} for seed in range(seeds)}
    return {
        "methods": mean,
        "std": std,
        "per_seed": per_seed,
        "fitted": fitted,
        "setting": "s",
        "machine": "m",
        "seconds": 1.0,
    }


def test_the_goals_are_read_from_the_numbers() -> None:
    methods = ("sgd", "temperature", "swag", "multiswag", "ensemble")
    good = _result(
        dict(zip(methods, (2.0, 2.5, 1.0, 0.9, 1.1), strict=True)),
        dict(zip(methods, (0.3, 0.3, 0.1, 0.1, 0.2), strict=True)),
    )
    text = shift_report.goals(good)
    assert "Goal 1 met on the 2-seed mean" in text and "met at all 27 shifted sets" in text
    # SWAG's ECE above temperature scaling's in one seed at 90° only: the mean still below, 1 seed of 2
    good["per_seed"][1]["swag"]["rot-90"]["ece"] = 0.35
    good["methods"]["swag"]["rot-90"]["ece"] = 0.225
    text = shift_report.goals(good)
    row = next(line for line in text.splitlines() if line.startswith("| 90°"))
    assert "SWAG ECE yes (1)" in row and "Goal 1 met" in text
    bad = _result(
        dict(zip(methods, (2.0, 2.5, 1.0, 1.2, 1.1), strict=True)),
        dict(zip(methods, (0.3, 0.3, 0.4, 0.1, 0.2), strict=True)),
    )
    text = shift_report.goals(bad)
    assert "Goal 1 **not met**" in text and "SWAG ECE **no** (0)" in text
    assert "**not met** at 27 of 27 shifted sets" in text and "rot-15 (1.200 vs 1.100)" in text


def test_the_report_and_the_figure_data_cover_every_method() -> None:
    methods = ("sgd", "temperature", "swa", "swag", "multiswag", "ensemble")
    result = _result(dict.fromkeys(methods, 1.0), dict.fromkeys(methods, 0.1), seeds=3)
    page = shift_report.report(result)
    for method in methods:
        assert page.count(f"| {shift_report.LABELS[method]} |") == 5  # four metric tables and the OOD one
    angles, curves = shift_report.rotation_curves(result)
    assert angles == [0, *range(15, 181, 15)] and set(curves) == {"NLL", "ECE"}
    assert curves["NLL"]["SWAG"] == ([1.0] * 13, [0.0] * 13)
    severities, values = shift_report.severity_values(result)
    assert severities == ["clean", "1", "2", "3", "4", "5"]
    assert [len(v) for v in values["ECE"]["SGD (MAP)"]] == [3] + [9] * 5  # seeds, then kinds × seeds


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0,x"],
        ["--members", "0"],
        ["--num-samples", "0"],
        ["--tune-scale", "1,-1"],
        ["--tune-scale", "a"],
    ],
)
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        shift.parse_args(argv)


@pytest.mark.slow
def test_shift_example_fast(tmp_path: Path) -> None:
    """``examples/shift.py --fast --out DIR`` as a user runs it: every method, shift and metric."""
    data_dir, extra = example_data(tmp_path, num_train=1500, num_test=300)
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "examples" / "shift.py"),
        "--fast",
        "--out",
        str(out),
        "--tune-scale",
        "0.5,1",
    ]
    subprocess.run([*command, "--data-dir", data_dir, *extra], check=True, cwd=tmp_path, timeout=420)
    saved = json.loads((out / "metrics.json").read_text())
    expected = [
        "sgd",
        "temperature",
        "swa",
        "swag_diagonal",
        "swag",
        "multiswag",
        "ensemble",
        "last_layer_linearized",
    ]
    if importlib.util.find_spec("laplace") is not None:
        expected.append("laplace_last_layer")
    else:
        assert "laplace-torch is not installed" in saved["fitted"]["0"]["skipped"]["laplace_last_layer"]
    assert list(saved["methods"]) == expected
    for name, table in saved["methods"].items():
        for key in SHIFTS:
            row = table[key]
            assert set(row) == set(shift.SHIFT_METRICS), (name, key)
            assert (
                0 <= row["accuracy"] <= 1
                and row["nll"] >= 0
                and 0 <= row["ece"] <= 1
                and 0 <= row["brier"] <= 2
            )
        assert table["clean"]["accuracy"] > 0.5, name  # far above chance (0.1)
        assert set(table["ood_auroc"]) == {"fashion_mnist", "uniform_noise"}
        # temperature scaling never moves the most probable class
        if name == "temperature":
            for key in SHIFTS:
                assert table[key]["accuracy"] == saved["methods"]["sgd"][key]["accuracy"]
    assert saved["fitted"]["0"]["temperature"] > 0
    scales = saved["fitted"]["0"]["scales"]
    assert set(scales) == {"swag_diagonal", "swag", "multiswag", "last_layer_linearized"}
    assert set(scales.values()) <= {0.5, 1.0}
    page = (out / "results.md").read_text()
    assert "| SWAG |" in page and "Goal 1" in page and "Goal 2" in page
    for figure in ("rotation.png", "corruption.png"):
        assert (out / figure).stat().st_size > 20_000


def test_the_last_layer_posterior_tracks_each_architectures_head() -> None:
    assert {name: shift.last_linear(cls()) for name, cls in shift.ARCHITECTURES.items()} == {
        "mlp": "net.3",
        "conv": "net.7",
    }
    with pytest.raises(ValueError, match="no nn.Linear head"):
        shift.last_linear(nn.Sequential(nn.Conv2d(1, 2, 3)))
