"""What ``SWAGCallback`` keeps, and how it goes into checkpoints.

:class:`CollectionState` is the callback's state: the posterior being collected (or, after a resume
under sharding, the saved whole one until the model is there to shard it) and the steps and epochs
already decided. The functions below put it into checkpoints and read it back: the posterior whole,
gathered, or as per-process DTensor views in a distributed checkpoint, the collection bookkeeping
and the SWALR states. The keys are those of :mod:`lightning_swag.posterior.format`; this module only
decides what goes where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_swag.lightning.swa_lr import SWALRSchedule
from lightning_swag.posterior.format import (
    CALLBACK_POSTERIOR_KEY,
    SHARDED_DESCRIPTION_KEY,
    callback_state,
    read_callback_state,
    saved_max_rank,
    sharded_statistics_prefix,
)
from lightning_swag.posterior.sharding import is_dtensor
from lightning_swag.posterior.swag import SWAGPosterior

__all__ = ["CollectionState", "load_distributed_part", "read_state", "save_sharded_posterior", "state_dict"]


@dataclass
class CollectionState:
    """The state of one collection run of :class:`~lightning_swag.SWAGCallback`."""

    posterior: SWAGPosterior | None = None
    pending: dict[str, Any] | None = None
    """A whole posterior read from a checkpoint, kept until the model is there to shard it."""
    last_epoch: int = -1
    """Epoch of the last epoch-end decision."""
    last_step: int = 0
    """``global_step`` of the last step decision."""
    snapshot_step: int = -1
    """``global_step`` of the last snapshot."""


def save_sharded_posterior(post: SWAGPosterior | None, checkpoint: dict[str, Any], state_key: str) -> None:
    """Add a sharded posterior to ``checkpoint`` (a collective: every process calls it). A distributed
    checkpoint (DTensor weights) stores each process's part as DTensor views next to the weight
    shards; any other checkpoint gets the whole posterior, gathered to rank 0, which writes it."""
    if post is None or not post.is_sharded:
        return
    state = checkpoint["callbacks"][state_key]
    distributed = any(is_dtensor(value) for value in checkpoint.get("state_dict", {}).values())
    if post.layout.per_process_checkpoint and distributed:  # the same answer on every process
        prefix = sharded_statistics_prefix(state_key)
        checkpoint["state_dict"].update(post.sharded_state_dict(prefix))
        state[SHARDED_DESCRIPTION_KEY] = post.sharded_description(prefix)
    else:
        whole = post.gather(dst=0)
        if whole is not None:
            state[CALLBACK_POSTERIOR_KEY] = whole.state_dict()


def load_distributed_part(
    checkpoint: dict[str, Any], state_key: str, ckpt_path: Any, model: nn.Module, device: torch.device
) -> SWAGPosterior | None:
    """This process's part of the posterior of a distributed checkpoint (``None`` for other
    checkpoints; a warning when the checkpoint holds no SWAG state at all)."""
    state = checkpoint.get("callbacks", {}).get(state_key)
    if state is None:
        rank_zero_warn(
            "SWAGCallback: the checkpoint holds no SWAG state (it was saved without this callback, or "
            "by a ModelCheckpoint(save_weights_only=True), which keeps no callback state); collection "
            "starts from a fresh posterior."
        )
        return None
    description = read_callback_state(state).sharded
    if description is None:
        return None
    return SWAGPosterior.from_distributed_checkpoint(ckpt_path, description, model, device=device)


def state_dict(state: CollectionState, swa_lr: SWALRSchedule | None) -> dict[str, Any]:
    """The callback's checkpoint state (a sharded posterior is added by :func:`save_sharded_posterior`)."""
    post = state.posterior
    return callback_state(
        posterior=post.state_dict() if post is not None and not post.is_sharded else None,
        last_epoch=state.last_epoch,
        last_step=state.last_step,
        swa_schedulers=swa_lr.state_dict() if swa_lr is not None else [],
        tracked=post.param_names if post is not None else None,
    )


def read_state(
    saved_state: dict[str, Any],
    state: CollectionState,
    max_rank: int,
    shards: bool,
    swa_lr: SWALRSchedule | None,
) -> None:
    """Restore ``state`` (and ``swa_lr``) from a checkpoint's callback state. ``shards``: the posterior
    is sharded across processes, so a whole saved one waits in ``state.pending`` for the model."""
    saved = read_callback_state(saved_state)
    whole = saved.posterior if saved.posterior is not None else saved.sharded
    if whole is not None and saved_max_rank(whole) != max_rank:
        rank_zero_warn(
            f"SWAGCallback: the checkpoint's posterior has max_rank={saved_max_rank(whole)} but the "
            f"callback was built with max_rank={max_rank}; the checkpoint's value is kept."
        )
    if saved.sharded is not None:
        pass  # load_distributed_part read this process's part from the distributed checkpoint
    elif saved.posterior and shards:
        state.posterior, state.pending = None, saved.posterior  # sharded in on_train_start
    else:
        state.posterior = (
            SWAGPosterior.from_state_dict(saved.posterior, source="the checkpoint's SWAGCallback state")
            if saved.posterior
            else None
        )
    state.last_epoch = saved.last_epoch
    state.last_step = saved.last_step
    state.snapshot_step = -1
    if swa_lr is not None:
        swa_lr.load_state_dict(saved.swa_schedulers)
