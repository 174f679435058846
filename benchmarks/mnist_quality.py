"""MNIST quality of subset posteriors: SGD, last-layer SWAG, full SWAG and last-layer Laplace.

Per seed, the reference classifier of :mod:`lightning_swag.experiments.mnist` (784 → 64 → ReLU →
10, logits) is pretrained with Adam, then SWAG is collected twice from those weights at a constant
SGD learning rate (snapshots twice per epoch, rank 20):

* **full SWAG**: every weight trained and tracked;
* **last-layer SWAG**: the body frozen at the pretrained weights and only the head ``net.3`` trained
  and tracked (``include=["net.3.*"]``), predicted with the sampled BMA (the body runs once per
  batch) and with the linearised predictive (probit), which for a linear head is exact;
* **last-layer Laplace** (laplace-torch, if installed): ``Laplace(..., subset_of_weights="last_layer",
  hessian_structure="kron")`` fitted on the MNIST training images at the pretrained weights, its
  prior precision optimised by the marginal likelihood (``optimize_prior_precision(method="marglik")``),
  predicted with the GLM predictive and the probit link. Without laplace-torch the row is skipped.

Every method is evaluated on the MNIST test images (accuracy, NLL, ECE with 15 bins) and against
Fashion-MNIST as out-of-distribution input (AUROC of the predictive entropy); the table gives
mean ± std over the seeds. The data root (torchvision layout) is ``--data-dir``, default
``$LIGHTNING_SWAG_DATA`` or ``/work/shared/data``.

Usage::

    python benchmarks/mnist_quality.py [--seeds 0,1,2] [--small] [--json results.json]

``--small``: 10,000 training and 2,000 test images, 3 + 3 epochs (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior, metrics
from lightning_swag.experiments import baselines, mnist
from lightning_swag.experiments.machine import machine_description
from lightning_swag.experiments.models import MNISTClassifier
from lightning_swag.experiments.trainer import quiet_trainer
from lightning_swag.lightning.quiet import quiet_lightning

HEAD = "net.3"
LAPLACE = "last-layer Laplace (laplace-torch, KFAC, GLM probit)"
METHODS = ("SGD", "last-layer SWAG, sampled", "last-layer SWAG, linearised", "full SWAG, sampled", LAPLACE)
COLUMNS = ("accuracy", "nll", "ece", "ood_auroc")
Predict = Callable[[Tensor], dict[str, Tensor]]


def collect(
    args: argparse.Namespace, dm: Any, model: MNISTClassifier, head_only: bool, seed: int
) -> SWAGPosterior:
    """Collect a posterior from a copy of the pretrained ``model`` at a constant SGD learning rate
    (``head_only``: the body frozen, only the head trained and tracked)."""
    L.seed_everything(seed + 1000 * head_only, verbose=False)
    model = copy.deepcopy(model)
    model.optimizer_name, model.lr, model.momentum = "sgd", args.collect_lr, 0.9
    if head_only:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(HEAD + "."))
    every = max(1, len(dm.train_dataloader()) // 2)
    swag = SWAGCallback(every_n_steps=every, max_rank=20, include=[f"{HEAD}.*"] if head_only else None)
    quiet_trainer(args.collect_epochs, [swag], accelerator=args.accelerator, validate=False).fit(
        model, datamodule=dm
    )
    return swag.posterior


def train_seed(
    args: argparse.Namespace, dm: Any, seed: int
) -> tuple[MNISTClassifier, SWAGPosterior, SWAGPosterior]:
    """The pretrained (SGD) model, its last-layer posterior and its full posterior."""
    L.seed_everything(seed, verbose=False)
    model = MNISTClassifier(lr=args.pretrain_lr, optimizer="adam")
    quiet_trainer(args.pretrain_epochs, accelerator=args.accelerator, validate=False).fit(
        model, datamodule=dm
    )
    head, full = collect(args, dm, model, True, seed), collect(args, dm, model, False, seed)
    return copy.deepcopy(model).eval(), head, full


def probs_predict(probs_of: Callable[[Tensor], Tensor]) -> Predict:
    """A SWAGModule-style ``predict`` (``mean`` and ``entropy``) from a function giving probabilities."""

    def predict(x: Tensor) -> dict[str, Tensor]:
        probs = probs_of(x)
        return {"mean": probs, "entropy": metrics.predictive_entropy(probs)}

    return predict


def laplace_predict(model: MNISTClassifier, dm: Any) -> Predict | None:
    """laplace-torch's last-layer KFAC Laplace of ``model``, or None without laplace-torch."""
    probs_of = baselines.laplace_last_layer(model, dm.train_tensors())
    if probs_of is None:
        print("laplace-torch is not installed: the last-layer Laplace row is skipped", flush=True)
        return None
    return probs_predict(probs_of)


@torch.no_grad()
def evaluate(predict: Predict, x: Tensor, y: Tensor, x_ood: Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE and OOD AUROC (entropy) of one method, in batches of 1,000."""
    outs = [predict(x[i : i + 1000]) for i in range(0, len(x), 1000)]
    oods = [predict(x_ood[i : i + 1000]) for i in range(0, len(x_ood), 1000)]
    probs = torch.cat([o["mean"] for o in outs])
    row = metrics.classification_metrics(probs, y)
    entropy_in, entropy_ood = torch.cat([o["entropy"] for o in outs]), torch.cat([o["entropy"] for o in oods])
    row["ood_auroc"] = float(metrics.ood_auroc(entropy_in, entropy_ood))
    return {k: row[k] for k in COLUMNS}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    """Train one seed's networks and evaluate every method (``seconds``: the evaluation's time)."""
    dm = mnist.make_datamodule(mnist.parse_args(_reference_argv(args, seed)))
    x, y = dm.test_tensors()
    x_ood, _ = dm.ood_tensors()
    sgd, head_post, full_post = train_seed(args, dm, seed)
    common = {"task": "classification", "seed": seed, "num_samples": args.num_samples, "scale": args.scale}
    methods: dict[str, Predict] = {
        "SGD": probs_predict(lambda x: torch.softmax(sgd(x), dim=-1)),
        "last-layer SWAG, sampled": SWAGModule(sgd, head_post, **common),
        "last-layer SWAG, linearised": SWAGModule(sgd, head_post, predictive="linearized", **common),
        "full SWAG, sampled": SWAGModule(sgd, full_post, **common),
    }
    if (laplace := laplace_predict(sgd, dm)) is not None:
        methods[LAPLACE] = laplace
    table = {}
    for name, predict in methods.items():
        start = time.perf_counter()
        table[name] = {**evaluate(predict, x, y, x_ood), "seconds": time.perf_counter() - start}
    print(
        f"seed {seed}: "
        + "; ".join(f"{n}: acc {r['accuracy']:.4f} nll {r['nll']:.4f}" for n, r in table.items()),
        flush=True,
    )
    return table


def _reference_argv(args: argparse.Namespace, seed: int) -> list[str]:
    argv = ["--data-dir", args.data_dir, "--seed", str(seed), "--batch-size", "128", "--accelerator", "cpu"]
    if args.small:
        argv += ["--subset", "10000", "--test-subset", "2000"]
    return argv


def format_table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    """Mean ± standard deviation over the seeds, a row per method that ran (accuracy and ECE in %)."""
    lines = [
        "| method | accuracy, % | NLL | ECE, % | OOD AUROC (Fashion-MNIST) | evaluation, s |",
        "|---|---|---|---|---|---|",
    ]
    for method in (m for m in METHODS if all(m in res for res in results.values())):
        cells = []
        for key, factor in (*((c, 100 if c in ("accuracy", "ece") else 1) for c in COLUMNS), ("seconds", 1)):
            values = [res[method][key] * factor for res in results.values()]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4g} ± {spread:.2g}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SWAG_DATA", "/work/shared/data"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--small", action="store_true", help="10,000 training images, 3 + 3 epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default 10 (3 with --small)")
    parser.add_argument("--collect-epochs", type=int, default=None, help="default 10 (3 with --small)")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--collect-lr", type=float, default=0.01)
    parser.add_argument("--num-samples", type=int, default=30)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 3 if args.small else 10
    if args.collect_epochs is None:
        args.collect_epochs = 3 if args.small else 10
    args.accelerator = "cpu"
    return args


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    """Run every seed, print the setting and the table; return the results by seed."""
    args = parse_args(argv)
    print(machine_description(), flush=True)
    start = time.perf_counter()
    with quiet_lightning(examples=True):
        results = {int(s): run_seed(args, int(s)) for s in args.seeds.split(",")}
    print(
        f"\nseeds {args.seeds}; pretrain {args.pretrain_epochs} epochs Adam lr {args.pretrain_lr}; collect "
        f"{args.collect_epochs} epochs SGD lr {args.collect_lr} momentum 0.9, 2 snapshots per epoch, rank 20; "
        f"{args.num_samples} samples, scale {args.scale}; {'small budget' if args.small else 'full data'}; "
        f"{time.perf_counter() - start:.0f} s in all\n"
    )
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
