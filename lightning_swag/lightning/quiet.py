"""Quiet command-line runs: a newcomer sees what the command says, not Lightning's banners.

Lightning prints, for every Trainer, which accelerators are available, a tips banner, the seed it
set and, for a model with a ``validation_step`` trained without a validation loader, a warning. None
of them is about the run, so the entry points that a person runs (the ``lightning-swag`` command and
the examples) run inside :func:`quiet_lightning`. ``LIGHTNING_SWAG_VERBOSE=1`` in the environment
gives Lightning's output back. The package's classes never silence anything: only these entry points.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["VERBOSE_ENV", "quiet_lightning", "verbose"]

VERBOSE_ENV = "LIGHTNING_SWAG_VERBOSE"
"""Set it (to anything but ``0``) to see Lightning's own output in the CLI and the examples."""

_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
_NOISE = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",)  # Lightning's own use of torch's pytree
_EXAMPLE_SET_UP = (  # true of the examples by design; about a user's own model in the CLI, so kept there
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    r".*does not have many workers which may be a bottleneck.*",
)


def verbose() -> bool:
    """Whether :data:`VERBOSE_ENV` asks for Lightning's own output."""
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


@contextmanager
def quiet_lightning(examples: bool = False) -> Iterator[None]:
    """Within the block, Lightning logs warnings and errors only, and its pytree deprecation warning
    is not shown; with ``examples``, neither are the warnings about the examples' deliberate set-up
    (no validation loader, no loader workers). Nothing changes when :func:`verbose`."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _NOISE + (_EXAMPLE_SET_UP if examples else ()):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
