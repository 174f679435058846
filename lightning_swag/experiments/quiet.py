"""Quiet experiment output: a newcomer running an example sees only what the experiment says.

Lightning prints, for every Trainer, which accelerators are available, a tips banner and, for a
model with a ``validation_step`` trained without a validation loader, a warning. None of them is
about the experiment, so the examples' command-line entry points run inside :func:`quiet_lightning`.
Library code never silences anything; this lives in the experiment kit only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_lightning"]

_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
_IGNORED_WARNINGS = (
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's own use of torch's pytree
)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning logs warnings and errors only, and the warnings listed above
    (about the experiments' deliberate set-up, not about results) are not shown."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
