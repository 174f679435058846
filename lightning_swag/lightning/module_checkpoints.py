"""``SWAGModule``'s posteriors in checkpoints: written with the model's weights, restored from a
``SWAGModule`` checkpoint or from the wrapped model's own training checkpoint (``SWAGCallback``
state), and kept as extra state so that a ``SWAGModule`` nested in another module keeps them too.
The keys are those of :mod:`lightning_swag.posterior.format`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_swag.posterior.format import (
    MODULE_POSTERIORS_KEY,
    add_module_extra_placeholder,
    module_extra_state,
    pop_module_extra_state,
    posterior_states,
    read_module_extra_state,
    wrapped_model_state,
)
from lightning_swag.posterior.swag import SWAGPosterior

__all__ = ["PosteriorCheckpoints"]


class PosteriorCheckpoints:
    """The checkpoint hooks of :class:`~lightning_swag.SWAGModule`."""

    @override
    def get_extra_state(self) -> dict[str, Any]:
        """The whole posteriors' states, so that a ``SWAGModule`` nested in another LightningModule
        keeps them in that module's checkpoint (sharded ones are gathered by
        :meth:`on_save_checkpoint` instead, a collective)."""
        if not self._posteriors or any(post.is_sharded for post in self._posteriors):
            return module_extra_state([])
        return module_extra_state([post.state_dict() for post in self._posteriors])

    @override
    def set_extra_state(self, state: Any) -> None:
        states = read_module_extra_state(state)
        if states:
            self.posteriors = [SWAGPosterior.from_state_dict(s, device="cpu") for s in states]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pop_module_extra_state(checkpoint.get("state_dict", {}))  # stored once, under its own key
        # sharded posteriors are gathered to rank 0, which writes the checkpoint (a collective)
        wholes = [post.gather(dst=0) for post in self._posteriors]
        if all(whole is not None for whole in wholes):
            checkpoint[MODULE_POSTERIORS_KEY] = [whole.state_dict() for whole in wholes if whole is not None]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept a checkpoint of the wrapped model's own training run (with SWAGCallback state) as
        well as a SWAGModule checkpoint: the model weights and the posterior(s) are restored."""
        if checkpoint.get("state_dict"):
            own = set(self.state_dict(keep_vars=True))
            checkpoint["state_dict"] = dict(wrapped_model_state(checkpoint["state_dict"], own, "model."))
        if "state_dict" in checkpoint:
            add_module_extra_placeholder(checkpoint["state_dict"])
        source = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        states = posterior_states(checkpoint)
        if states:
            if self._posteriors:
                rank_zero_warn(
                    f"SWAGModule: the checkpoint's {len(states)} posterior(s) replaces the posterior(s) given "
                    "to SWAGModule; build SWAGModule(model, posterior=None) to restore from the checkpoint "
                    "silently, or leave out ckpt_path to keep yours."
                )
            self.posteriors = [SWAGPosterior.from_state_dict(s, device="cpu", source=source) for s in states]
        elif not self._posteriors:
            raise RuntimeError(_no_posterior_message(checkpoint))


def _no_posterior_message(checkpoint: dict[str, Any]) -> str:
    if "callbacks" not in checkpoint and "optimizer_states" not in checkpoint:
        return (
            "The checkpoint holds only weights (it was written with ModelCheckpoint(save_weights_only=True) or "
            "trainer.save_checkpoint(..., weights_only=True)), and a weights-only checkpoint holds no callback "
            "state, so no SWAG posterior. Save checkpoints with save_weights_only=False next to SWAGCallback, "
            "or pass the posterior to SWAGModule (swag.posterior, or SWAGPosterior.load(path))."
        )
    return (
        "The checkpoint holds no SWAG posterior (it was not saved by a Trainer with SWAGCallback, or before "
        "the first snapshot), and SWAGModule was built without one."
    )
