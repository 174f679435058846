"""Uncertainty under distribution shift (Ovadia et al. 2019) on the reference MNIST classifier
(or, with ``--model conv``, a small convolutional net).

The MNIST test images are rotated by 15° to 180° and corrupted by Gaussian noise, blur and lowered
contrast at severities 1 to 5 (:mod:`lightning_swag.experiments.data.shift`, generated here, seeded);
Fashion-MNIST and uniform-noise images are the out-of-distribution sets. Every method is scored on
every shifted set (accuracy, NLL, ECE with 15 bins, Brier: torch-uncertainty's ``Acc``, ``NLL``,
``ECE``, ``Brier``) and on telling the OOD sets from the clean test images (AUROC of the maximum
softmax probability, torch-uncertainty's default ``msp`` criterion, and of the predictive entropy).

Methods, at the same training budget per network: ``members`` networks (``--model``) are
pretrained with Adam for ``pretrain_epochs`` each; from those weights

* ``sgd`` continues Adam for ``collect_epochs`` (the MAP network: ``pretrain + collect`` epochs);
  ``temperature`` is it with its temperature fitted on held-out clean training images
  (:func:`lightning_swag.metrics.fit_temperature`); ``ensemble`` averages the members' MAP networks;
* ``swa``, ``swag_diagonal`` and ``swag`` come from a SWAG posterior collected over ``collect_epochs``
  of constant-rate SGD (twice per epoch, rank 20), ``multiswag`` from all members' posteriors;
* ``last_layer_linearized``: the first MAP network's body frozen, its head trained for another
  ``collect_epochs`` at the constant rate and tracked (the only method with extra epochs, of the
  head alone), predicted with the linearised (probit) predictive;
* ``laplace_last_layer``: laplace-torch's last-layer KFAC Laplace of the first MAP network (GLM,
  probit), when laplace-torch is installed (the ``examples`` extra); skipped with a note otherwise.

Writes ``metrics.json`` (``{"methods": {method: {"clean": {...}, "rot-15": {...}, ..., "noise-3":
{...}, "ood_auroc": {...}}}}``, the mean over ``--seeds``; ``std`` and ``per_seed`` beside it),
``results.md`` and the figures ``rotation.png`` and ``corruption.png`` to ``--out``.

    python examples/shift.py --data-dir ../shared/data --seeds 0,1,2 --out outputs/shift   # full run
    python examples/shift.py --fast --out DIR                                             # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior, metrics
from lightning_swag.experiments import baselines, shift_report
from lightning_swag.experiments.data import MNISTDataModule
from lightning_swag.experiments.data.mnist import MNIST_MEAN, MNIST_STD
from lightning_swag.experiments.data.shift import CORRUPTIONS, SEVERITIES, corrupt, rotate
from lightning_swag.experiments.machine import machine_description
from lightning_swag.experiments.models import DigitClassifier, MNISTClassifier, MNISTConvClassifier
from lightning_swag.experiments.plots import plot_severity_boxes, plot_shift_curves, save_figure
from lightning_swag.experiments.trainer import quiet_trainer
from lightning_swag.lightning.quiet import quiet_lightning

ROTATIONS = tuple(range(15, 181, 15))
"""Rotation angles in degrees (0° is the clean set)."""
SHIFT_METRICS = ("accuracy", "nll", "ece", "brier")
OOD_SETS = ("fashion_mnist", "uniform_noise")
ARCHITECTURES: dict[str, type[DigitClassifier]] = {
    "mlp": MNISTClassifier,
    "conv": MNISTConvClassifier,
}
"""``--model``: the reference MLP (784 → 64 → ReLU → 10) or a small convolutional net."""
_CHUNK = 2000  # images per prediction call


@dataclass
class Member:
    """One trained network: its MAP weights and the SWAG posterior collected from its pretraining."""

    map_model: DigitClassifier
    posterior: SWAGPosterior


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SWAG_DATA", "./data"))
    parser.add_argument("--out", default="outputs/shift", help="folder for metrics.json, results.md, figures")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the tables give mean ± std")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="mlp", help="the network trained")
    parser.add_argument("--members", type=int, default=3, help="networks in MultiSWAG and the ensemble")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--collect-epochs", type=int, default=10)
    parser.add_argument("--collect-lr", type=float, default=0.01)
    parser.add_argument("--max-rank", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=30, help="weight samples per posterior")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--val-size", type=int, default=5000, help="held-out training images (temperature)")
    parser.add_argument(
        "--tune-scale",
        default="",
        help="comma-separated candidate scales: the SWAG methods each take the one with the lowest NLL on "
        "the held-out images that tune the temperature (default: --scale for all)",
    )
    parser.add_argument("--subset", type=int, default=None, help="training images used (default all)")
    parser.add_argument("--test-subset", type=int, default=None, help="test and OOD images (default all)")
    parser.add_argument("--every-n-steps", type=int, default=None, help="default: twice per epoch")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--fast", action="store_true", help="a small subset and 2 + 2 epochs (CI)")
    args = parser.parse_args(argv)
    if args.fast:
        args.subset, args.test_subset = args.subset or 3000, args.test_subset or 500
        args.val_size = min(args.val_size, 500)
        args.pretrain_epochs, args.collect_epochs, args.num_samples = 2, 2, 8
        args.every_n_steps = args.every_n_steps or 5
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
        args.scale_candidates = [float(s) for s in args.tune_scale.split(",") if s]
    except ValueError:
        parser.error(
            f"--seeds and --tune-scale take comma-separated numbers, got {args.seeds!r}, {args.tune_scale!r}"
        )
    if any(scale < 0 for scale in args.scale_candidates):
        parser.error("--tune-scale candidates must be >= 0")
    for name in ("members", "pretrain_epochs", "collect_epochs", "num_samples", "val_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ------------------------------------------------------------------------------------ training


def _make_datamodule(args: argparse.Namespace, seed: int) -> MNISTDataModule:
    dm = MNISTDataModule(
        data_dir=args.data_dir,
        batch_size=128,
        val_size=args.val_size,
        subset=args.subset,
        test_subset=args.test_subset,
        seed=seed,
    )
    dm.prepare_data()
    dm.setup()
    return dm


def _collect(
    args: argparse.Namespace, dm: MNISTDataModule, model: DigitClassifier, include: list[str] | None = None
) -> SWAGPosterior:
    """Train ``model`` in place at the constant SGD rate for ``collect_epochs`` while SWAG collects."""
    model.optimizer_name, model.lr, model.momentum = "sgd", args.collect_lr, 0.9
    every = args.every_n_steps or max(1, len(dm.train_dataloader()) // 2)
    swag = SWAGCallback(every_n_steps=every, max_rank=args.max_rank, include=include)
    quiet_trainer(args.collect_epochs, [swag], validate=False).fit(model, datamodule=dm)
    return swag.posterior


class _KeepWeights(L.Callback):
    """Copies the weights at the end of epoch ``epoch`` (the SWAG runs start from there)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.state: dict[str, Tensor] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def train_member(args: argparse.Namespace, dm: MNISTDataModule, seed: int) -> Member:
    """One network: Adam for ``pretrain + collect`` epochs (the MAP weights) and, from its weights
    after ``pretrain`` epochs, SWAG over ``collect`` epochs of constant-rate SGD."""
    L.seed_everything(seed, verbose=False)
    map_model = ARCHITECTURES[args.model](lr=args.pretrain_lr, optimizer="adam")
    keep = _KeepWeights(args.pretrain_epochs - 1)
    quiet_trainer(args.pretrain_epochs + args.collect_epochs, [keep], validate=False).fit(
        map_model, datamodule=dm
    )
    swag_model = ARCHITECTURES[args.model](lr=args.pretrain_lr, optimizer="adam")
    swag_model.load_state_dict(keep.state)
    L.seed_everything(seed, verbose=False)
    return Member(map_model.eval(), _collect(args, dm, swag_model))


def train_last_layer(
    args: argparse.Namespace, dm: MNISTDataModule, map_model: DigitClassifier
) -> SWAGPosterior:
    """The head of a copy of ``map_model`` trained at the constant rate and tracked, its body frozen."""
    model = ARCHITECTURES[args.model](lr=args.collect_lr, optimizer="sgd")
    model.load_state_dict(map_model.state_dict())
    head = last_linear(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + "."))
    return _collect(args, dm, model, include=[f"{head}.*"])


def last_linear(model: nn.Module) -> str:
    """The name of ``model``'s last ``nn.Linear`` module (the head of both architectures)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head for the last-layer posterior")
    return names[-1]


# ---------------------------------------------------------------------------------- the methods


def _bma(module: SWAGModule) -> baselines.Probabilities:
    module.eval()
    return lambda x: module(x)["mean"]


_TUNED = ("swag_diagonal", "swag", "multiswag", "last_layer_linearized")
"""The methods whose scale ``--tune-scale`` chooses (SWA has none)."""


def build_methods(
    args: argparse.Namespace, dm: MNISTDataModule, members: list[Member], seed: int
) -> tuple[dict[str, baselines.Probabilities], dict[str, Any]]:
    """Every method as a function from normalised images to probabilities, and what was fitted
    (the temperature; the methods skipped, with why)."""
    first = members[0]
    x_val, y_val = dm.val_tensors()
    with torch.no_grad():
        temperature = metrics.fit_temperature(first.map_model(x_val), y_val)
    bma = {"task": "classification", "seed": seed, "num_samples": args.num_samples, "scale": args.scale}
    head = train_last_layer(args, dm, first.map_model)
    modules = {
        "swa": SWAGModule(first.map_model, first.posterior, **{**bma, "num_samples": 1, "scale": 0.0}),
        "swag_diagonal": SWAGModule(first.map_model, first.posterior, covariance="diagonal", **bma),
        "swag": SWAGModule(first.map_model, first.posterior, **bma),
        "multiswag": SWAGModule(first.map_model, [m.posterior for m in members], **bma),
        "last_layer_linearized": SWAGModule(first.map_model, head, predictive="linearized", **bma),
    }
    scales = {}
    if args.scale_candidates:
        held_out = [(x_val[i : i + _CHUNK], y_val[i : i + _CHUNK]) for i in range(0, len(x_val), _CHUNK)]
        for name in _TUNED:
            modules[name].tune_scale(held_out, args.scale_candidates)
            scales[name] = modules[name].scale
    methods: dict[str, baselines.Probabilities] = {
        "sgd": baselines.softmax(first.map_model),
        "temperature": baselines.softmax(first.map_model, temperature),
        **{name: _bma(modules[name]) for name in ("swa", "swag_diagonal", "swag", "multiswag")},
        "ensemble": baselines.ensemble([m.map_model for m in members]),
        "last_layer_linearized": _bma(modules["last_layer_linearized"]),
    }
    fitted: dict[str, Any] = {"temperature": temperature, "scales": scales, "skipped": {}}
    laplace = baselines.laplace_last_layer(first.map_model, dm.train_tensors())
    if laplace is None:
        fitted["skipped"]["laplace_last_layer"] = "laplace-torch is not installed (pip install '.[examples]')"
    else:
        methods["laplace_last_layer"] = laplace
    return methods, fitted


# --------------------------------------------------------------------------------- evaluation


def _normalise(pixels: Tensor) -> Tensor:
    return (pixels - MNIST_MEAN) / MNIST_STD


def shifted_sets(images: Tensor, seed: int) -> Iterator[tuple[str, Tensor]]:
    """``(name, images)`` for the clean set, ``rot-15`` … ``rot-180`` and ``noise-1`` … ``contrast-5``,
    one at a time; ``images`` are MNIST-normalised and so are the results."""
    pixels = (images * MNIST_STD + MNIST_MEAN).clamp(0, 1)
    yield "clean", images
    for angle in ROTATIONS:
        yield f"rot-{angle}", _normalise(rotate(pixels, angle))
    for kind in CORRUPTIONS:
        for severity in SEVERITIES:
            yield f"{kind}-{severity}", _normalise(corrupt(pixels, kind, severity, seed=seed))


def uniform_noise_images(count: int, seed: int) -> Tensor:
    """``count`` images of independent uniform pixels, MNIST-normalised (a synthetic OOD set)."""
    generator = torch.Generator().manual_seed(seed)
    return _normalise(torch.rand(count, 1, 28, 28, generator=generator))


@torch.no_grad()
def probabilities(method: baselines.Probabilities, images: Tensor) -> Tensor:
    """``method`` on ``images`` in chunks of 2,000, concatenated (float32)."""
    return torch.cat([method(images[i : i + _CHUNK]).float() for i in range(0, len(images), _CHUNK)])


def evaluate(
    methods: dict[str, baselines.Probabilities],
    images: Tensor,
    labels: Tensor,
    ood: dict[str, Tensor],
    seed: int,
) -> dict[str, dict[str, Any]]:
    """``{method: {shift: {accuracy, nll, ece, brier}, "ood_auroc": {...}, "ood_auroc_entropy": {...}}}``."""
    table: dict[str, dict[str, Any]] = {name: {} for name in methods}
    clean: dict[str, Tensor] = {}
    for shift, shifted in shifted_sets(images, seed):
        for name, method in methods.items():
            probs = probabilities(method, shifted)
            row = metrics.classification_metrics(probs, labels)
            table[name][shift] = {key: row[key] for key in SHIFT_METRICS}
            if shift == "clean":
                clean[name] = probs
    for name, method in methods.items():
        table[name]["ood_auroc"], table[name]["ood_auroc_entropy"] = {}, {}
        for ood_name, ood_images in ood.items():
            out = probabilities(method, ood_images)
            table[name]["ood_auroc"][ood_name] = float(
                metrics.ood_auroc(1 - clean[name].amax(dim=-1), 1 - out.amax(dim=-1))
            )
            table[name]["ood_auroc_entropy"][ood_name] = float(
                metrics.ood_auroc(metrics.predictive_entropy(clean[name]), metrics.predictive_entropy(out))
            )
    return table


def run_seed(args: argparse.Namespace, seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Train and evaluate every method for one seed (its networks use seeds ``1000 * seed + i``)."""
    start = time.perf_counter()
    dm = _make_datamodule(args, seed)
    members = [train_member(args, dm, 1000 * seed + i) for i in range(args.members)]
    methods, fitted = build_methods(args, dm, members, seed)
    train_seconds = time.perf_counter() - start
    images, labels = dm.test_tensors()
    ood = {"fashion_mnist": dm.ood_tensors()[0], "uniform_noise": uniform_noise_images(len(images), seed)}
    table = evaluate(methods, images, labels, ood, seed)
    fitted["seconds"] = {"train": train_seconds, "evaluate": time.perf_counter() - start - train_seconds}
    print(
        f"seed {seed}: {fitted['seconds']['train']:.0f} s training, {fitted['seconds']['evaluate']:.0f} s evaluation"
    )
    return table, fitted


# ---------------------------------------------------------------------------------- reporting


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: float) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def aggregate(per_seed: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and (sample) standard deviation of every number over the seeds (std 0 for one seed)."""
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    values: dict[tuple[str, ...], list[float]] = {}
    for table in per_seed.values():
        for path, value in _leaves(table):
            values.setdefault(path, []).append(value)
    for path, seq in values.items():
        if len(seq) != len(per_seed):
            continue  # a method missing in some seed is left out of the summary
        _set(mean, path, statistics.mean(seq))
        _set(std, path, statistics.stdev(seq) if len(seq) > 1 else 0.0)
    return mean, std


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every seed, then ``metrics.json``, ``results.md`` and the figures in ``--out``."""
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed, fitted = {}, {}
    for seed in args.seed_list:
        per_seed[seed], fitted[seed] = run_seed(args, seed)
    mean, std = aggregate(per_seed)
    result = {
        "methods": mean,
        "std": std,
        "per_seed": per_seed,
        "fitted": fitted,
        "setting": setting(args),
        "machine": machine_description(),
        "seconds": time.perf_counter() - start,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    page = shift_report.report(result)
    (out / "results.md").write_text(page)
    if not args.no_figures:
        angles, curves = shift_report.rotation_curves(result)
        save_figure(plot_shift_curves(angles, curves, "rotation, degrees"), out / "rotation.png")
        severities, values = shift_report.severity_values(result)
        save_figure(plot_severity_boxes(values, severities), out / "corruption.png")
    print(page)
    return result


def setting(args: argparse.Namespace) -> str:
    """The run's options in one sentence (on the results page)."""
    return (
        f"{args.model} network; seeds {args.seeds}; {args.members} members; pretrain {args.pretrain_epochs} epochs Adam lr "
        f"{args.pretrain_lr}; collect {args.collect_epochs} epochs SGD lr {args.collect_lr} momentum 0.9, "
        f"rank {args.max_rank}; {args.num_samples} samples per posterior, "
        + (f"scales tuned among {args.tune_scale}; " if args.tune_scale else f"scale {args.scale}; ")
        + f"training images {args.subset or 'all'} less {args.val_size} held out; "
        f"test images {args.test_subset or 10000}"
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python examples/shift.py [options]``)."""
    with quiet_lightning(examples=True):
        run(parse_args(argv))


if __name__ == "__main__":
    main()
