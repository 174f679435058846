"""Lightning glue: the Trainer reads checkpoints weights-only, with errors that name the file.

``SWAGCallback`` and ``SWAGModule`` wrap the strategy's ``CheckpointIO`` in their ``setup`` hook,
before Lightning reads ``ckpt_path``, and put it back once it is read. The wrapper loads every
checkpoint, local or remote (``http(s)://``, where Lightning itself would unpickle by default), with
``weights_only=True``, unless the caller passed ``weights_only=False`` to ``trainer.fit`` /
``predict`` / ``test`` explicitly. A checkpoint that needs unpickling is refused with
:class:`~lightning_swag.posterior.format.UnsafeFileError`; a damaged one gives a ``ValueError`` naming it.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.strategies import Strategy

from lightning_swag.posterior.format import UnsafeFileError, file_error

__all__ = ["WeightsOnlyCheckpointIO", "readable_checkpoint_errors", "restore_checkpoint_io"]

_HOW_TO_TRUST = (
    " If you trust this checkpoint, pass weights_only=False to trainer.fit / predict / test explicitly."
)


class WeightsOnlyCheckpointIO(CheckpointIO):
    """Delegates to the strategy's checkpoint IO, loading weights only (see the module docstring)."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("weights_only") is not False:
            kwargs["weights_only"] = True
        try:
            return self.inner.load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - torch raises many types for damaged or unsafe files
            if not isinstance(path, (str, os.PathLike)):
                raise
            error = file_error(path, "checkpoint", err)
            if isinstance(error, UnsafeFileError):
                raise UnsafeFileError(f"{error}{_HOW_TO_TRUST}") from err
            if os.path.isfile(path):
                raise error from err
            raise

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def readable_checkpoint_errors(strategy: Strategy) -> None:
    """Wrap ``strategy``'s checkpoint IO (see the module docstring); :func:`restore_checkpoint_io`
    undoes it."""
    current = strategy.checkpoint_io
    if not isinstance(current, WeightsOnlyCheckpointIO):
        strategy.checkpoint_io = WeightsOnlyCheckpointIO(current)


def restore_checkpoint_io(strategy: Strategy) -> None:
    """Put back the checkpoint IO that :func:`readable_checkpoint_errors` wrapped."""
    current = strategy.checkpoint_io
    if isinstance(current, WeightsOnlyCheckpointIO):
        strategy.checkpoint_io = current.inner
