"""The experiments' Trainer: one device, and nothing printed or written of its own."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

__all__ = ["quiet_trainer"]


def quiet_trainer(
    epochs: int = 1, callbacks: Sequence[L.Callback] = (), accelerator: str = "cpu", validate: bool = True
) -> L.Trainer:
    """A single-device Trainer without logger, checkpoints, progress bar or model summary; with
    ``validate=False`` it also skips the validation loop (and its sanity check)."""
    skip_validation = {} if validate else {"num_sanity_val_steps": 0, "limit_val_batches": 0}
    return L.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **skip_validation,
    )
