"""Two-process DDP (gloo, CPU) prediction on ``MNISTDataModule``'s test set, for ``test_distributed.py``.

Usage::

    python tests/ddp_predict_mnist_script.py DATA_DIR POSTERIOR_AND_MODEL OUT_DIR

Every rank loads the same model weights and posterior, runs ``trainer.predict`` with
``SWAGPredictionWriter`` under ``strategy="ddp"`` (Lightning re-runs this script for rank 1) and
writes one predictions file per rank into ``OUT_DIR``.
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch

from lightning_swag import SWAGModule, SWAGPosterior, SWAGPredictionWriter
from lightning_swag.experiments.data import MNISTDataModule
from lightning_swag.experiments.models import MNISTClassifier

TEST_SUBSET, EVAL_BATCH, NUM_SAMPLES, SEED = 500, 64, 4, 7


def datamodule(data_dir: str) -> MNISTDataModule:
    return MNISTDataModule(
        data_dir=data_dir, download=False, eval_batch_size=EVAL_BATCH, test_subset=TEST_SUBSET, val_size=0
    )


def main(data_dir: str, saved: str, out: str) -> None:
    warnings.filterwarnings("ignore")
    state = torch.load(saved, weights_only=True)
    model = MNISTClassifier()
    model.load_state_dict(state["model"])
    bma = SWAGModule(
        model,
        SWAGPosterior.from_state_dict(state["posterior"]),
        num_samples=NUM_SAMPLES,
        task="classification",
        seed=SEED,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SWAGPredictionWriter(out)],
    )
    trainer.predict(bma, datamodule=datamodule(data_dir), return_predictions=False)


if __name__ == "__main__":
    main(*sys.argv[1:4])
