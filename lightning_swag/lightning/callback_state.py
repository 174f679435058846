"""``SWAGCallback``'s state in checkpoints: the posterior (whole, gathered, or as per-process
DTensor views in a distributed checkpoint), the collection bookkeeping and the SWALR states. The
keys are those of :mod:`lightning_swag.posterior.format`; this module only decides what goes where.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

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

__all__ = ["CallbackCheckpoints"]


class CallbackCheckpoints:
    """The checkpoint hooks of :class:`~lightning_swag.SWAGCallback`."""

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Sharded statistics: a collective (Lightning calls it on every process). A distributed
        checkpoint (DTensor weights) stores each process's part as DTensor views next to the weight
        shards; any other checkpoint gets the whole posterior, gathered to rank 0, which writes it."""
        post = self._posterior
        if post is None or not post.is_sharded:
            return
        state = checkpoint["callbacks"][self.state_key]
        distributed = any(is_dtensor(value) for value in checkpoint.get("state_dict", {}).values())
        if post.layout.per_process_checkpoint and distributed:  # the same answer on every process
            prefix = sharded_statistics_prefix(self.state_key)
            checkpoint["state_dict"].update(post.sharded_state_dict(prefix))
            state[SHARDED_DESCRIPTION_KEY] = post.sharded_description(prefix)
        else:
            whole = post.gather(dst=0)
            if whole is not None:
                state[CALLBACK_POSTERIOR_KEY] = whole.state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            rank_zero_warn(
                "SWAGCallback: the checkpoint holds no SWAG state (it was saved without this callback, or "
                "by a ModelCheckpoint(save_weights_only=True), which keeps no callback state); collection "
                "starts from a fresh posterior."
            )
            return
        description = read_callback_state(state).sharded
        if description is not None:  # each process reads its own part from the distributed checkpoint
            self._posterior = SWAGPosterior.from_distributed_checkpoint(
                trainer.ckpt_path, description, pl_module, device=self._target_device(pl_module)
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        post = self._posterior
        return callback_state(
            # a sharded posterior is added (gathered, or as DTensors) by on_save_checkpoint
            posterior=post.state_dict() if post is not None and not post.is_sharded else None,
            last_epoch=self._last_epoch,
            last_step=self._last_step,
            swa_schedulers=self._swa_lr.state_dict() if self._swa_lr is not None else [],
            tracked=post.param_names if post is not None else None,
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = read_callback_state(state_dict)
        whole = saved.posterior if saved.posterior is not None else saved.sharded
        if whole is not None and saved_max_rank(whole) != self.max_rank:
            rank_zero_warn(
                f"SWAGCallback: the checkpoint's posterior has max_rank={saved_max_rank(whole)} but the "
                f"callback was built with max_rank={self.max_rank}; the checkpoint's value is kept."
            )
        if saved.sharded is not None:
            pass  # on_load_checkpoint read this process's part from the distributed checkpoint
        elif saved.posterior and self._shards_statistics():
            self._posterior, self._pending_state = None, saved.posterior  # sharded in on_train_start
        else:
            self._posterior = (
                SWAGPosterior.from_state_dict(saved.posterior, source="the checkpoint's SWAGCallback state")
                if saved.posterior
                else None
            )
        self._last_epoch = saved.last_epoch
        self._last_step = saved.last_step
        self._snapshot_step = -1
        if self._swa_lr is not None:
            self._swa_lr.load_state_dict(saved.swa_schedulers)
