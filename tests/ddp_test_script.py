"""Two-process DDP (gloo, CPU) ``trainer.test`` for ``test_distributed.py``: the test metrics of 37 rows,
with Lightning's default sampler (which repeats a row to give both processes 19) and with the recipe
of the distributed guide (``use_distributed_sampler=False`` and an ``UnrepeatedDistributedSampler``).

Usage::

    python tests/ddp_test_script.py OUT_DIR

Rank 0 writes ``metrics.pt``: ``{"default": {...}, "exact": {...}, "linearized_mc": {...}}`` (the
recipe with ``predictive="linearized", link_approx="mc"``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from ddp_train_script import QUIET, TinyClassifier, dataset
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from lightning_swag import SWAGModule, SWAGPosterior

NUM_ROWS, BATCH_SIZE, NUM_SAMPLES, SEED = 37, 8, 4, 0
LINEARIZED_MC = {"predictive": "linearized", "link_approx": "mc", "num_samples": 50, "seed": 2}
"""The linearised predictive's Monte Carlo link: its draws must not depend on the batches or processes."""


def test_set() -> torch.utils.data.Dataset:
    return dataset(NUM_ROWS, seed=2)


def swag_module(**options) -> SWAGModule:
    """The same model and posterior in every process (a seeded random walk around the weights)."""
    torch.manual_seed(0)
    model = TinyClassifier()
    posterior = SWAGPosterior.from_model(model, max_rank=3)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape))
        posterior.collect(model)
    return SWAGModule(
        model, posterior, **{"num_samples": NUM_SAMPLES, "task": "classification", "seed": SEED, **options}
    )


class ExactTestData(L.LightningDataModule):
    """The guide's recipe: every row once, on one process (the processes may get unequal shares)."""

    def test_dataloader(self) -> DataLoader:
        sampler = UnrepeatedDistributedSampler(
            test_set(), num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(test_set(), batch_size=BATCH_SIZE, sampler=sampler)


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    default = L.Trainer(**QUIET).test(swag_module(), DataLoader(test_set(), batch_size=BATCH_SIZE))
    trainer = L.Trainer(**QUIET, use_distributed_sampler=False)
    exact = trainer.test(swag_module(), datamodule=ExactTestData())
    linearized = trainer.test(swag_module(**LINEARIZED_MC), datamodule=ExactTestData())
    if trainer.global_rank == 0:
        torch.save(
            {"default": default[0], "exact": exact[0], "linearized_mc": linearized[0]}, out / "metrics.pt"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
