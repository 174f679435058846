"""Write the stored files of ``tests/test_stored_files.py``: a posterior file and a Lightning checkpoint
written by SWAGCallback, with the predictions a SWAGModule makes from each (fixed seed), so that files
written by this version keep loading, and predicting the same, after the code changes.

Run once, from the repository root, with the version whose files are to be kept:

    python tests/make_fixtures.py

It writes ``tests/fixtures/v0_1/`` (``posterior.pt``, ``callback.ckpt``, ``expected.pt``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import lightning as L
import torch
from conftest import QUIET, TinyRegressor
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule

OUT = Path(__file__).parent / "fixtures" / "v0_1"
INPUTS = torch.linspace(-2, 2, 24).reshape(6, 4)
OPTIONS = {"num_samples": 5, "seed": 7, "task": "regression"}


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyRegressor()
    swag = SWAGCallback(start_epoch=1, max_rank=3)
    options = {**QUIET, "enable_checkpointing": True, "default_root_dir": str(OUT / "run")}
    trainer = L.Trainer(max_epochs=5, callbacks=[swag], **options)
    trainer.fit(model, data())
    trainer.save_checkpoint(OUT / "callback.ckpt", weights_only=False)
    swag.posterior.save(OUT / "posterior.pt")
    with torch.no_grad():
        from_posterior = SWAGModule(model, swag.posterior, **OPTIONS)(INPUTS)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    torch.save(
        {
            "commit": commit,
            "inputs": INPUTS,
            "options": OPTIONS,
            "model_state": model.state_dict(),
            "mean": swag.posterior.mean.clone(),
            "variance": swag.posterior.variance.clone(),
            "deviations": swag.posterior.deviations.clone(),
            "num_snapshots": swag.posterior.num_snapshots,
            "prediction": {k: v.clone() for k, v in from_posterior.items()},
        },
        OUT / "expected.pt",
    )
    for leftover in sorted((OUT / "run").rglob("*"), reverse=True):
        leftover.unlink() if leftover.is_file() else leftover.rmdir()
    (OUT / "run").rmdir()


if __name__ == "__main__":
    main()
