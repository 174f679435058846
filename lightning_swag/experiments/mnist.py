"""MNIST with SGD, SWA, SWAG-Diagonal, SWAG and MultiSWAG: the reference notebook's second experiment.

Each run pretrains the notebook's classifier (784 → 64 → ReLU → 10, logits, Adam) and then collects
a SWAG posterior with ``SWAGCallback`` while training continues at a constant learning rate
(``--collect-optimizer``/``--collect-lr``). Snapshots are taken twice per collection epoch, so
that the 10 collection epochs fill the paper's rank K = 20 (one per epoch would give only 10). The first run gives the SGD (final pretrained weights),
SWA, SWAG-Diagonal and SWAG rows; ``--runs`` independent runs together give MultiSWAG (``--workers``
trains them in that many processes at once, which pays off on a GPU, where one small run leaves
the device mostly idle). Every method
is evaluated on the 10,000 MNIST test images (accuracy, NLL, Brier, ECE, entropy, mutual
information) and against Fashion-MNIST as out-of-distribution input (AUROC of the predictive
entropy). Writes ``results.md``, ``results.json`` and figures to ``--output-dir``.

    python examples/mnist.py --data-dir ../shared/data         # full protocol
    python examples/mnist.py --data-dir ../shared/data --fast  # ~1 minute on CPU (used by the tests)
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior, metrics
from lightning_swag.experiments.data import MNISTDataModule
from lightning_swag.experiments.models import MNISTClassifier
from lightning_swag.experiments.plots import (
    plot_entropy_histograms,
    plot_reliability_diagrams,
    plot_uncertain_digits,
    save_figure,
)
from lightning_swag.experiments.trainer import quiet_trainer
from lightning_swag.lightning.quiet import quiet_lightning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SWAG_DATA", "./data"))
    parser.add_argument("--download", action="store_true", help="let torchvision download MNIST")
    parser.add_argument("--output-dir", default="outputs/mnist")
    parser.add_argument("--runs", type=int, default=3, help="independent runs for MultiSWAG (>= 1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="train the independent runs in this many processes at once (same results as 1)",
    )
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--collect-epochs", type=int, default=10)
    parser.add_argument("--collect-optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--collect-lr", type=float, default=0.01)
    parser.add_argument("--collect-momentum", type=float, default=0.9)
    parser.add_argument("--every-n-epochs", type=int, default=None, help="collect every N epochs instead")
    parser.add_argument(
        "--snapshots-per-epoch",
        type=int,
        default=2,
        help="snapshots per collection epoch when neither --every-n-epochs nor --every-n-steps is given",
    )
    parser.add_argument("--every-n-steps", type=int, default=None, help="collect every N steps instead")
    parser.add_argument("--max-rank", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=30)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument(
        "--scale-sweep",
        default="",
        help="comma-separated extra scales evaluated for SWAG on the same posterior (investigation rows)",
    )
    parser.add_argument(
        "--val-size", type=int, default=0, help="training images held out for --tune-scale (default none)"
    )
    parser.add_argument(
        "--tune-scale",
        default="",
        help="comma-separated candidate scales; SWAG-Diagonal, SWAG and MultiSWAG each use the one "
        "with the lowest NLL on the --val-size held-out images (SWAGModule.tune_scale)",
    )
    parser.add_argument("--subset", type=int, default=None, help="training images used (default all)")
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--pin-to-device", action="store_true", help="keep the decoded data on the training device (GPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-figures", action="store_true", help="write the tables only (for sweeps)")
    parser.add_argument("--fast", action="store_true", help="small subset and few epochs (CPU, ~1 min)")
    args = parser.parse_args(argv)
    if args.fast:
        args.subset, args.test_subset = args.subset or 6000, args.test_subset or 2000
        args.pretrain_epochs, args.collect_epochs, args.num_samples = 3, 3, 10
        args.every_n_epochs, args.every_n_steps = None, 10
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option combinations that make no sense, as argparse errors."""
    if args.every_n_steps is not None and args.every_n_epochs is not None:
        parser.error("give --every-n-epochs or --every-n-steps, not both")
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.tune_scale and args.val_size < 1:
        parser.error("--tune-scale needs held-out images: add --val-size N (e.g. 5000)")


def make_datamodule(args: argparse.Namespace) -> MNISTDataModule:
    """The experiment's data, decoded and set up."""
    dm = MNISTDataModule(
        data_dir=args.data_dir,
        download=args.download,
        batch_size=args.batch_size,
        val_size=args.val_size,
        subset=args.subset,
        test_subset=args.test_subset,
        seed=args.seed,
        pin_to_device=args.pin_to_device,
    )
    dm.prepare_data()
    dm.setup()
    return dm


def train_run(
    args: argparse.Namespace, dm: MNISTDataModule, run: int
) -> tuple[MNISTClassifier, SWAGPosterior]:
    """Pretrain, then collect SWAG. Returns a copy of the pretrained (SGD) model and the posterior."""
    L.seed_everything(args.seed + run, verbose=False)
    model = MNISTClassifier(lr=args.pretrain_lr, optimizer="adam")
    quiet_trainer(args.pretrain_epochs, accelerator=args.accelerator, validate=False).fit(
        model, datamodule=dm
    )
    sgd_model = copy.deepcopy(model)
    # Collection phase: same model, constant learning rate; SWAGCallback snapshots the weights.
    model.optimizer_name, model.lr, model.momentum = (
        args.collect_optimizer,
        args.collect_lr,
        args.collect_momentum,
    )
    every_n_steps = args.every_n_steps
    if every_n_steps is None and args.every_n_epochs is None:
        every_n_steps = max(1, len(dm.train_dataloader()) // args.snapshots_per_epoch)
    swag = SWAGCallback(
        start_epoch=0,
        every_n_epochs=args.every_n_epochs,
        every_n_steps=every_n_steps,
        max_rank=args.max_rank,
    )
    quiet_trainer(args.collect_epochs, [swag], accelerator=args.accelerator, validate=False).fit(
        model, datamodule=dm
    )
    return sgd_model, swag.posterior


def _train_run_in_worker(args: argparse.Namespace, run: int) -> bytes:
    """One run in a worker process; the SGD weights and the posterior come back serialized (CPU)."""
    sgd_model, posterior = train_run(args, make_datamodule(args), run)
    buffer = io.BytesIO()
    torch.save({"model": sgd_model.cpu().state_dict(), "posterior": posterior.to("cpu").state_dict()}, buffer)
    return buffer.getvalue()


def train_runs(args: argparse.Namespace, dm: MNISTDataModule) -> list[tuple[MNISTClassifier, SWAGPosterior]]:
    """All ``--runs`` runs, in this process or in ``--workers`` spawned processes.

    Each run is seeded by its index alone (and the data order by the epoch), so both ways give the
    same models and posteriors.
    """
    workers = min(args.workers, args.runs)
    if workers == 1:
        return [train_run(args, dm, r) for r in range(args.runs)]
    context = torch.multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        payloads = list(pool.map(_train_run_in_worker, [args] * args.runs, range(args.runs)))
    runs = []
    for payload in payloads:
        state = torch.load(io.BytesIO(payload), weights_only=True)
        model = MNISTClassifier(lr=args.pretrain_lr, optimizer="adam")
        model.load_state_dict(state["model"])
        runs.append((model, SWAGPosterior.from_state_dict(state["posterior"], device="cpu")))
    return runs


@torch.no_grad()
def evaluate(predict, x_test, y_test, x_ood) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics of one method; ``predict(x)`` returns a SWAGModule-style dict (``mean`` = probs)."""
    out_in, out_ood = predict(x_test), predict(x_ood)
    row = metrics.classification_metrics(out_in["mean"], y_test)
    row["mutual_information"] = float(out_in["mutual_information"].mean())
    row["ood_auroc"] = float(metrics.ood_auroc(out_in["entropy"], out_ood["entropy"]))
    return row, {"in": out_in, "ood": out_ood}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dm = make_datamodule(args)
    x_test, y_test = dm.test_tensors()
    x_ood, _ = dm.ood_tensors()

    runs = train_runs(args, dm)
    train_seconds = time.perf_counter() - start
    # Evaluate where the data lives (the GPU with --pin-to-device; Lightning hands models back on
    # the CPU after fit); the posteriors stay where they are and samples are moved to the model.
    device = x_test.device
    x_ood, y_test = x_ood.to(device), y_test.to(device)
    sgd_model, posterior = runs[0]
    sgd_model.to(device).eval()

    def sgd_predict(x: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = torch.softmax(sgd_model(x), dim=-1)
        entropy = metrics.predictive_entropy(probs)
        return {
            "mean": probs,
            "std": torch.zeros_like(probs),
            "entropy": entropy,
            "mutual_information": 0 * entropy,
        }

    methods: dict[str, Any] = {"SGD": sgd_predict, **_bma_methods(args, sgd_model, runs)}
    eval_start = time.perf_counter()
    tuned = {}
    if args.tune_scale:
        candidates = [float(v) for v in args.tune_scale.split(",")]
        for name, predict in methods.items():
            fixed = name == "SWA" or name.startswith("SWAG (scale")  # the sweep rows keep their scale
            if isinstance(predict, SWAGModule) and not fixed:
                predict.tune_scale(dm.val_dataloader(), candidates)
                tuned[name] = predict.scale
    table, outputs = {}, {}
    for name, predict in methods.items():
        if isinstance(predict, SWAGModule):
            predict.eval()
        table[name], outputs[name] = evaluate(predict, x_test, y_test, x_ood)
    eval_seconds = time.perf_counter() - eval_start
    total_seconds = time.perf_counter() - start

    write_results(args, table, out_dir, train_seconds, eval_seconds, total_seconds, posterior, tuned)
    if not args.no_figures:
        save_figures(x_test, y_test, table, outputs, out_dir)
    return table


def _bma_methods(args: argparse.Namespace, sgd_model: nn.Module, runs: list) -> dict[str, SWAGModule]:
    """SWA, SWAG-Diagonal, SWAG, MultiSWAG and the scale-sweep rows, all over the first run's model."""
    posterior = runs[0][1]
    common = {"task": "classification", "seed": args.seed}
    methods = {
        "SWA": SWAGModule(sgd_model, posterior, num_samples=1, scale=0.0, **common),
        "SWAG-Diagonal": SWAGModule(
            sgd_model,
            posterior,
            num_samples=args.num_samples,
            scale=args.scale,
            covariance="diagonal",
            **common,
        ),
        "SWAG": SWAGModule(sgd_model, posterior, num_samples=args.num_samples, scale=args.scale, **common),
    }
    if args.runs > 1:
        methods[f"MultiSWAG ({args.runs} runs)"] = SWAGModule(
            sgd_model, [post for _, post in runs], num_samples=args.num_samples, scale=args.scale, **common
        )
    for extra in filter(None, args.scale_sweep.split(",")):
        methods[f"SWAG (scale {float(extra):g})"] = SWAGModule(
            sgd_model, posterior, num_samples=args.num_samples, scale=float(extra), **common
        )
    return methods


def save_figures(x_test, y_test, table, outputs, out_dir: Path) -> None:
    """The most uncertain digits (SWAG), reliability diagrams and MNIST vs Fashion-MNIST entropy."""
    x_test_cpu, y_test_cpu = x_test.cpu(), y_test.cpu()
    swag_out = outputs["SWAG"]["in"]
    save_figure(
        plot_uncertain_digits(
            x_test_cpu,
            swag_out["mean"].cpu(),
            swag_out["std"].cpu(),
            y_test_cpu,
            title="SWAG: most uncertain test digits",
        ),
        out_dir / "uncertain_digits.png",
    )
    main_methods = [name for name in outputs if not name.startswith("SWAG (scale")]
    curves = {
        name: metrics.reliability_curve(outputs[name]["in"]["mean"].cpu(), y_test_cpu)
        for name in main_methods
    }
    save_figure(
        plot_reliability_diagrams(curves, {n: r["ece"] for n, r in table.items()}),
        out_dir / "reliability.png",
    )
    save_figure(
        plot_entropy_histograms(
            {n: outputs[n]["in"]["entropy"].cpu() for n in main_methods},
            {n: outputs[n]["ood"]["entropy"].cpu() for n in main_methods},
        ),
        out_dir / "entropy_histograms.png",
    )


def write_results(
    args, table, out_dir, train_seconds, eval_seconds, total_seconds, posterior, tuned=None
) -> None:
    header = "| method | accuracy | NLL | Brier | ECE | entropy | MI | OOD AUROC |\n|---|---|---|---|---|---|---|---|\n"
    lines = [
        f"| {name} | {100 * r['accuracy']:.2f}% | {r['nll']:.4f} | {r['brier']:.4f} | {100 * r['ece']:.2f}% | "
        f"{r['entropy']:.4f} | {r['mutual_information']:.4f} | {r['ood_auroc']:.4f} |"
        for name, r in table.items()
    ]
    setting = (
        f"runs={args.runs}, pretrain {args.pretrain_epochs} epochs Adam lr {args.pretrain_lr}, collect "
        f"{args.collect_epochs} epochs {args.collect_optimizer} lr {args.collect_lr} momentum {args.collect_momentum}, "
        f"{posterior.num_snapshots} snapshots, rank {posterior.rank}, {args.num_samples} samples, scale {args.scale}, "
        f"train images {args.subset or 'all'}, test images {len(table) and (args.test_subset or 10000)}"
    )
    if tuned:
        chosen = ", ".join(f"{name} {scale:g}" for name, scale in tuned.items())
        setting += f"; scales tuned on {args.val_size} held-out training images: {chosen}"
    elif args.val_size:
        setting += f"; {args.val_size} training images held out"
    timing = f"train {train_seconds:.1f} s, evaluation {eval_seconds:.1f} s, total {total_seconds:.1f} s"
    markdown = f"{header}{chr(10).join(lines)}\n\n{setting}\n\n{timing}\n"
    (out_dir / "results.md").write_text(markdown)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "methods": table,
                "setting": setting,
                "tuned_scales": tuned or {},
                "seconds": {"train": train_seconds, "eval": eval_seconds, "total": total_seconds},
            },
            indent=2,
        )
    )
    print(markdown)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python examples/mnist.py [options]``), without Lightning's banners."""
    with quiet_lightning(examples=True):
        run(parse_args(argv))


if __name__ == "__main__":
    main()
