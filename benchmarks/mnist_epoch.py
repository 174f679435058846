"""Time one MNIST training epoch: the reference notebook's pipeline vs. ``MNISTDataModule`` + Lightning.

(a) reference: ``torchvision.datasets.MNIST(transform=ToTensor())`` -> ``DataLoader(batch_size=128,
    shuffle=True)`` -> plain PyTorch loop, ``784 -> 64 -> ReLU -> 10``, Adam(lr=1e-3), cross-entropy.
(b) ours: ``MNISTDataModule`` (decoded once into a tensor, batches cut by indexing) +
    ``MNISTClassifier`` under ``L.Trainer(max_epochs=1, accelerator="cpu", ...)``.
(c) for reference: ``MNISTDataModule``'s batches fed to the plain loop of (a), which separates the
    data pipeline's gain from the Trainer's own per-step overhead.

All train on all 60,000 training images (``val_size=0`` for ours) with batches of 128. Two
times are reported per pipeline: the epoch alone, and end to end (building the data set first).

Usage::

    python benchmarks/mnist_epoch.py [--data-dir PATH] [--repeats 3] [--threads N] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms

from lightning_swag.experiments.data.mnist import MNISTDataModule
from lightning_swag.experiments.machine import cpu_name
from lightning_swag.experiments.models import MNISTClassifier

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 128


def default_data_dir() -> str:
    """``$LIGHTNING_SWAG_DATA`` if set, else ``../shared/data`` next to the repository."""
    return os.environ.get("LIGHTNING_SWAG_DATA") or str((REPO_ROOT / ".." / "shared" / "data").resolve())


def plain_pytorch_epoch(loader: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float, int]:
    """The notebook's training loop over ``loader``: ``784 -> 64 -> ReLU -> 10``, Adam(1e-3), cross-entropy.

    Returns ``(seconds, mean training loss, samples seen)``.
    """
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    total_loss, total_samples = 0.0, 0
    for images, labels in loader:
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * labels.shape[0]
        total_samples += labels.shape[0]
    return time.perf_counter() - start, total_loss / total_samples, total_samples


def _plain_loop_run(
    make_loader: Callable[[], Iterable[tuple[Tensor, Tensor]]], seed: int
) -> dict[str, float]:
    """Build the loader (timed end to end) and train one epoch of the plain loop over it."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    epoch_s, train_loss, samples = plain_pytorch_epoch(make_loader())
    return {
        "epoch_s": epoch_s,
        "end_to_end_s": time.perf_counter() - start,
        "train_loss": train_loss,
        "samples": samples,
    }


def reference_epoch(data_dir: str, seed: int) -> dict[str, float]:
    """(a) The notebook's pipeline: per-sample PIL -> ToTensor through a DataLoader, plain loop."""

    def make_loader() -> DataLoader:
        dataset = torchvision.datasets.MNIST(
            root=data_dir, train=True, transform=transforms.ToTensor(), download=False
        )
        return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)

    return _plain_loop_run(make_loader, seed)


def tensor_loader_epoch(data_dir: str, seed: int) -> dict[str, float]:
    """(c) ``MNISTDataModule``'s batches through the same plain loop: the data pipeline alone."""

    def make_loader() -> Iterable[tuple[Tensor, Tensor]]:
        datamodule = MNISTDataModule(
            data_dir=data_dir, download=False, batch_size=BATCH_SIZE, val_size=0, seed=seed
        )
        return datamodule.train_dataloader()

    return _plain_loop_run(make_loader, seed)


def lightning_epoch(data_dir: str, seed: int) -> dict[str, float]:
    """(b) ``MNISTDataModule`` + ``MNISTClassifier`` under the Lightning ``Trainer`` for one epoch."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    datamodule = MNISTDataModule(
        data_dir=data_dir, download=False, batch_size=BATCH_SIZE, val_size=0, seed=seed
    )
    datamodule.prepare_data()
    datamodule.setup("fit")  # decode now so the fit below times the epoch (fit's own setup is a no-op)
    model = MNISTClassifier(hidden=64, lr=1e-3, optimizer="adam")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    epoch_start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    end = time.perf_counter()
    return {
        "epoch_s": end - epoch_start,
        "end_to_end_s": end - start,
        "train_loss": float(trainer.callback_metrics["train_loss"]),
        "samples": int(datamodule.train_tensors()[0].shape[0]),
    }


def best_of(runs: list[dict[str, float]], key: str) -> float:
    return min(run[key] for run in runs)


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="root with MNIST/raw/*-idx*-ubyte")
    parser.add_argument("--repeats", type=int, default=1, help="run each pipeline N times; report the best")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners

    reference_runs, lightning_runs, tensor_loader_runs = [], [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all alike
        reference_runs.append(reference_epoch(args.data_dir, args.seed))
        lightning_runs.append(lightning_epoch(args.data_dir, args.seed))
        tensor_loader_runs.append(tensor_loader_epoch(args.data_dir, args.seed))

    results = {
        "machine": {
            "cpu": cpu_name(),
            "platform.processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "reference": reference_runs,
        "lightning_swag": lightning_runs,
        "tensor_loader_plain_loop": tensor_loader_runs,
    }
    machine = results["machine"]
    print(
        f"machine: {machine['cpu']} | {machine['cpu_count']} CPUs | torch {machine['torch']} "
        f"({machine['torch_threads']} threads) | torchvision {machine['torchvision']} | "
        f"lightning {machine['lightning']}"
    )
    print(
        f"one epoch of MNIST training ({reference_runs[0]['samples']:.0f} images, batch {BATCH_SIZE}), "
        f"best of {args.repeats}:"
    )
    print(
        f"{'pipeline':<48}{'epoch [s]':>11}{'median':>9}{'end-to-end [s]':>16}{'train loss':>12}"
        "   all epochs [s]"
    )
    for name, runs in (
        ("(a) notebook: ToTensor + DataLoader + loop", reference_runs),
        ("(b) MNISTDataModule + MNISTClassifier + Trainer", lightning_runs),
        ("(c) MNISTDataModule batches + plain loop of (a)", tensor_loader_runs),
    ):
        all_epochs = ", ".join(f"{run['epoch_s']:.2f}" for run in runs)
        print(
            f"{name:<48}{best_of(runs, 'epoch_s'):>11.2f}{median_of(runs, 'epoch_s'):>9.2f}"
            f"{best_of(runs, 'end_to_end_s'):>16.2f}{runs[-1]['train_loss']:>12.4f}   {all_epochs}"
        )
    epoch_ratio = best_of(reference_runs, "epoch_s") / best_of(lightning_runs, "epoch_s")
    total_ratio = best_of(reference_runs, "end_to_end_s") / best_of(lightning_runs, "end_to_end_s")
    print(f"speed-up (a)/(b), best times: {epoch_ratio:.1f}x per epoch, {total_ratio:.1f}x end to end")
    print(
        "(a) feeds raw [0, 1] pixels as the notebook did; (b) and (c) normalize with the MNIST mean/std, "
        "hence the lower loss. (b) - (c) is the Trainer's own overhead. Best-of-N guards against other "
        "load on the machine."
    )
    results["speedup_epoch"] = epoch_ratio
    results["speedup_end_to_end"] = total_ratio
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
