"""The batch layout: how the model input and the targets are found in a batch.

Every part of lightning-swag that reads batches (BMA prediction, ``trainer.test`` metrics,
``tune_scale``/``fit_noise``, the BatchNorm refresh and the prediction writer) goes through
:meth:`SWAGModule.batch_inputs` and :meth:`SWAGModule.batch_targets`, whose defaults are the two
functions below. For other layouts (dicts, dataclasses, ...) override those two methods in a
subclass of :class:`~lightning_swag.SWAGModule`; nothing else needs to change.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["default_batch_inputs", "default_batch_targets"]

_OVERRIDE_HINT = (
    "For other batch layouts, subclass SWAGModule and override batch_inputs(batch) and "
    "batch_targets(batch); every step (predict, test, tune_scale, the BatchNorm refresh, the "
    "prediction writer) uses them."
)


def default_batch_inputs(batch: Any) -> Any:
    """The model input: the batch itself when it is a tensor, else the first element of a tuple/list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(
        f"Cannot find the model input in a batch of type {type(batch).__name__}: the default layout is a "
        f"tensor or a tuple/list whose first element is the input. {_OVERRIDE_HINT}"
    )


def default_batch_targets(batch: Any) -> Any:
    """The targets: the second element of a tuple/list batch ``(inputs, targets, ...)``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise TypeError(
        f"This step needs labelled batches, but got a {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}: the default layout "
        f"is a tuple/list (inputs, targets, ...). {_OVERRIDE_HINT}"
    )
