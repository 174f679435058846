"""Two-process DDP (gloo, CPU) run for ``test_distributed.py``: SWAG training, then BMA prediction.

Usage::

    python tests/ddp_train_script.py OUT_DIR

Lightning's ``strategy="ddp"`` re-runs this script for rank 1. Each rank writes:

* ``posterior_rank{r}.pt``: its SWAG posterior (``SWAGPosterior.save``);
* ``fit_rank{r}.pt``: the weights it recorded itself at every epoch SWAG collects (trainable
  parameters as ``parameters_to_vector``, at ``on_train_epoch_end`` = the weights of SWAG's
  last-batch snapshot), its final ``state_dict`` and the data indices it trained on;
* ``written_rank{r}.pt``: what a ``BasePredictionWriter`` received in ``trainer.predict``
  (predictions and dataset indices of this rank's batches);
* ``returned_rank{r}.pt``: what ``trainer.predict`` returned on this rank.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule

START_EPOCH, MAX_EPOCHS, MAX_RANK = 1, 5, 3
NUM_SAMPLES, SEED = 5, 0
QUIET = {
    "accelerator": "cpu",
    "devices": 2,
    "strategy": "ddp",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class TinyClassifier(L.LightningModule):
    """4 → 16 → 3 MLP, SGD with momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        self.seen: dict[int, list[int]] = {}  # epoch -> data indices this rank trained on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.setdefault(self.current_epoch, []).extend(index.tolist())
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def dataset(n: int, seed: int) -> TensorDataset:
    """Three Gaussian blobs in 4-D, with the sample index as a third field."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    x = centres[y] + torch.randn(n, 4, generator=g)
    return TensorDataset(x, y, torch.arange(n))


def train_loader() -> DataLoader:
    return DataLoader(dataset(128, seed=0), batch_size=16, shuffle=False)


def predict_loader() -> DataLoader:
    """40 inputs (tensors only: SWAGModule reads the first element of a batch)."""
    return DataLoader(dataset(40, seed=1).tensors[0], batch_size=8, shuffle=False)


class EpochRecorder(L.Callback):
    """The trainable weights at the end of every epoch SWAG collects, recorded independently of SWAG."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= START_EPOCH:
            params = [p for p in pl_module.parameters() if p.requires_grad]
            self.snapshots.append(torch.nn.utils.parameters_to_vector(params).detach().double().clone())


class RankWriter(BasePredictionWriter):
    """Writes each rank's predictions and their dataset indices (the documented way to gather them)."""

    def __init__(self, out: Path) -> None:
        super().__init__(write_interval="epoch")
        self.out = out

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        torch.save(
            {"predictions": predictions, "batch_indices": batch_indices},
            self.out / f"written_rank{trainer.global_rank}.pt",
        )


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = TinyClassifier()
    swag = SWAGCallback(start_epoch=START_EPOCH, max_rank=MAX_RANK)
    recorder = EpochRecorder()
    trainer = L.Trainer(max_epochs=MAX_EPOCHS, callbacks=[swag, recorder], **QUIET)
    trainer.fit(model, train_dataloaders=train_loader())
    rank = trainer.global_rank
    swag.posterior.save(out / f"posterior_rank{rank}.pt")
    torch.save(
        {
            "snapshots": recorder.snapshots,
            "state_dict": model.state_dict(),
            "seen": model.seen,
            "world_size": trainer.world_size,
        },
        out / f"fit_rank{rank}.pt",
    )

    bma = SWAGModule(model, swag.posterior, num_samples=NUM_SAMPLES, task="classification", seed=SEED)
    predictor = L.Trainer(callbacks=[RankWriter(out)], **QUIET)
    returned = predictor.predict(bma, predict_loader(), return_predictions=True)
    torch.save({"returned": returned}, out / f"returned_rank{predictor.global_rank}.pt")

    # Without a seed the ranks must still agree on the weight samples: SWAGModule broadcasts rank
    # 0's run seed. The global RNGs are made to differ per rank, so agreement is not an accident.
    torch.manual_seed(1000 + rank)  # scripts may seed; the library never does
    unseeded = SWAGModule(model, swag.posterior, num_samples=NUM_SAMPLES, task="classification")
    L.Trainer(**QUIET).predict(unseeded, predict_loader(), return_predictions=False)
    torch.save({"run_seed": unseeded.engine.current_seed()}, out / f"unseeded_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
