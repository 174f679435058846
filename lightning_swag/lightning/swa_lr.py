"""The SWA learning rate of the collection phase: torch's ``SWALR``, stepped by ``SWAGCallback``.

``SWALR`` is never put into the Trainer's scheduler configs. Lightning would save its state as the
user's scheduler and, on resume, load it into a freshly built ``LambdaLR`` (Lightning issue
#11665), and manual optimization never steps those configs. Instead :class:`SWALRSchedule` steps
the schedulers once at the end of every collection epoch and carries their state in the callback's
own checkpoint state. Under automatic optimization the user's schedulers are removed from the
Trainer when collection starts (they would fight SWALR); under manual optimization they stay,
because the user's ``training_step`` steps them itself (a warning says the two now both set the
learning rate).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.swa_utils import SWALR

__all__ = ["SWALRSchedule"]


class SWALRSchedule:
    """One ``SWALR`` per optimizer of the Trainer, from the first collection epoch on.

    Args:
        swa_lr: the learning rate of the collection phase.
        annealing_epochs: epochs to anneal from the current learning rate to ``swa_lr``.
        annealing_strategy: ``"cos"`` or ``"linear"``.
    """

    def __init__(
        self, swa_lr: float, annealing_epochs: int, annealing_strategy: Literal["cos", "linear"]
    ) -> None:
        self.swa_lr = swa_lr
        self.annealing_epochs = annealing_epochs
        self.annealing_strategy = annealing_strategy
        self.schedulers: list[SWALR] = []
        self._saved: list[dict[str, Any]] = []

    @property
    def installed(self) -> bool:
        """Whether the schedulers of this run are built."""
        return bool(self.schedulers)

    def reset(self) -> None:
        """Forget the schedulers of an earlier run."""
        self.schedulers, self._saved = [], []

    def install(self, trainer: L.Trainer) -> None:
        """Build the schedulers; on resume, continue the saved annealing exactly."""
        resume = len(self._saved) == len(trainer.optimizers)
        for index, optimizer in enumerate(trainer.optimizers):
            restored_lrs = [group["lr"] for group in optimizer.param_groups]
            scheduler = SWALR(
                optimizer,
                swa_lr=self.swa_lr,
                anneal_epochs=self.annealing_epochs,
                anneal_strategy=self.annealing_strategy,
            )
            if resume:
                # the constructor took a step; the checkpoint's optimizer already holds the
                # learning rates of the interrupted run
                scheduler.load_state_dict(self._saved[index])
                for group, lr in zip(optimizer.param_groups, restored_lrs, strict=True):
                    group["lr"] = lr
            self.schedulers.append(scheduler)
        self._saved = []
        self._set_aside_user_schedulers(trainer)

    def step(self) -> None:
        """One epoch of annealing (called at the end of every collection epoch)."""
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> list[dict[str, Any]]:
        """The schedulers' states (kept in the callback's checkpoint state)."""
        return [scheduler.state_dict() for scheduler in self.schedulers] or list(self._saved)

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Restore saved states; applied when the schedulers are built on resume."""
        self.schedulers, self._saved = [], list(states)

    @staticmethod
    def _set_aside_user_schedulers(trainer: L.Trainer) -> None:
        if not trainer.lr_scheduler_configs:
            return
        if trainer.lightning_module.automatic_optimization:
            rank_zero_info("SWAGCallback: the LR scheduler is replaced by SWALR for the collection phase.")
            trainer.strategy.lr_scheduler_configs = []
        else:
            rank_zero_warn(
                "SWAGCallback(swa_lr=...): under manual optimization your training_step steps its own LR "
                "scheduler, and SWALR now sets the learning rate too at every epoch end. Stop stepping "
                "yours from the first collection epoch on, or leave swa_lr unset."
            )
