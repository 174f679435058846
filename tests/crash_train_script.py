"""A training run for ``test_crash_resume.py``: SWAGCallback + step checkpoints, optionally SIGKILLed.

Usage::

    python tests/crash_train_script.py OUT_DIR --mode epoch|step [--kill-at-step N] [--resume CKPT] [--tag NAME]

Every snapshot SWAG takes is written to ``OUT_DIR/snapshots/{tag}_{n:03d}.pt`` (weights, epoch,
step) and fsync'ed at once, so the snapshots of a run that gets killed survive it. With
``--kill-at-step N`` the process sends itself SIGKILL in ``on_train_batch_end`` of step ``N``,
after SWAG's snapshot of that step (if any) but before ``ModelCheckpoint`` (always called last)
can save it. The final posterior goes to ``OUT_DIR/posterior_{tag}.pt``.

Lightning replays a plain (non-stateful) DataLoader from the start of the epoch after a mid-epoch
resume, so the batches are generated from ``global_step`` instead of read from the loader: the
resumed run then trains on exactly the batches of an uninterrupted run, which makes that run an
exact reference.
"""

from __future__ import annotations

import argparse
import os
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_swag import SWAGCallback

BATCHES_PER_EPOCH = 4
MAX_EPOCHS = 4
CHECKPOINT_EVERY = 3  # steps: 3, 6, 9, 12, 15
MAX_RANK = 3


class StepDataNet(L.LightningModule):
    """A small MLP trained with SGD + momentum on batches that depend only on ``global_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(10_000 + self.global_step)
        x = torch.randn(16, 4, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def index_loader() -> DataLoader:
    """``BATCHES_PER_EPOCH`` dummy batches (the module makes its own data)."""
    return DataLoader(torch.arange(BATCHES_PER_EPOCH), batch_size=1, shuffle=False)


class SnapshotLogger(L.Callback):
    """Writes every snapshot the SWAG callback takes to disk immediately (fsync'ed)."""

    def __init__(self, swag: SWAGCallback, directory: Path, tag: str) -> None:
        self.swag, self.directory, self.tag = swag, directory, tag
        self.seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.seen = self.swag.num_snapshots  # > 0 after a resume

    def _check(self, trainer, pl_module) -> None:
        n = self.swag.num_snapshots
        if n == self.seen:
            return
        assert n == self.seen + 1, f"SWAG took {n - self.seen} snapshots at once"
        self.seen = n
        theta = torch.nn.utils.parameters_to_vector(pl_module.parameters()).detach().double().clone()
        record = {"n": n, "epoch": trainer.current_epoch, "step": trainer.global_step, "theta": theta}
        path = self.directory / f"{self.tag}_{n:03d}.pt"
        with open(path, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)


class KillAtStep(L.Callback):
    """SIGKILLs this process at the end of optimizer step ``step`` (no cleanup, no exit handlers)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make_swag(mode: str) -> SWAGCallback:
    """Epoch mode: a snapshot at the end of every epoch; step mode: every 2 optimizer steps."""
    if mode == "epoch":
        return SWAGCallback(start_epoch=0, every_n_epochs=1, max_rank=MAX_RANK)
    if mode == "step":
        return SWAGCallback(every_n_steps=2, max_rank=MAX_RANK)
    raise ValueError(f"unknown mode {mode!r}")


def run(
    out: Path, mode: str, tag: str, kill_at_step: int | None = None, resume: Path | None = None
) -> SWAGCallback:
    """Train (from scratch or from ``resume``) and return the SWAG callback."""
    warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint need to be provided.*")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = StepDataNet()
    swag = make_swag(mode)
    callbacks: list[L.Callback] = [swag, SnapshotLogger(swag, out / "snapshots", tag)]
    if kill_at_step is not None:
        callbacks.append(KillAtStep(kill_at_step))
    callbacks.append(
        ModelCheckpoint(
            dirpath=out / "ckpt",
            filename="{step}",
            every_n_train_steps=CHECKPOINT_EVERY,
            save_top_k=-1,
            save_last=True,
        )
    )
    trainer = L.Trainer(
        max_epochs=MAX_EPOCHS,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=index_loader(), ckpt_path=resume)
    swag.posterior.save(out / f"posterior_{tag}.pt")
    return swag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=["epoch", "step"], required=True)
    parser.add_argument("--tag", default="run")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume", type=Path)
    args = parser.parse_args()
    run(args.out, args.mode, args.tag, args.kill_at_step, args.resume)


if __name__ == "__main__":
    main()
