"""Reference LightningModules of the two experiments (sine regression, MNIST classification).

They are ordinary LightningModules: nothing in them knows about SWAG. ``forward`` returns raw
outputs (regression values, or logits for classification), which is what :class:`SWAGModule`
expects.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

OptimizerName = Literal["sgd", "adam"]


def _first_two(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("Expected a batch of (inputs, targets); got " + type(batch).__name__)
    return batch[0], batch[1]


class _ReferenceModule(L.LightningModule):
    """Shared optimizer set-up and train/val/test steps of the reference models."""

    def __init__(self, lr: float, optimizer: OptimizerName, momentum: float, weight_decay: float) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _step(self, batch: Any, stage: str) -> Tensor:
        inputs, targets = _first_two(batch)
        outputs = self(inputs)
        loss = self.loss(outputs, targets)
        if stage == "train":
            # The epoch mean is accumulated here and logged once per epoch: ``self.log`` on every
            # step costs about a quarter of an MNIST epoch on a CPU.
            self._train_loss_sum = self._train_loss_sum + loss.detach() * len(targets)
            self._train_count += len(targets)
        else:
            self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
            self.log_eval_metrics(outputs.detach(), targets, stage)
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum: Tensor | float = 0.0
        self._train_count = 0

    def on_train_epoch_end(self) -> None:
        if self._train_count:
            mean = torch.as_tensor(self._train_loss_sum, dtype=torch.float32) / self._train_count
            self.log("train_loss", mean, sync_dist=True)

    def log_eval_metrics(self, outputs: Tensor, targets: Tensor, stage: str) -> None:
        """Hook for extra validation/test metrics; the default logs nothing."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Raw outputs for the inputs of a ``(inputs, targets)`` batch or of a bare input tensor."""
        inputs = batch if isinstance(batch, Tensor) else batch[0]
        return self(inputs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # On a GPU the fused kernels update all parameters in one launch: these models are so small
        # that a step is bound by kernel launches, not arithmetic.
        fused = True if self.device.type == "cuda" else None
        if self.optimizer_name == "adam":
            return torch.optim.Adam(
                self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=fused
            )
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, fused=fused
        )


class SineRegressor(_ReferenceModule):
    """The notebook's regression net: ``Linear(1, hidden) -> ReLU -> Linear(hidden, 1)``, MSE loss.

    Args:
        hidden: width of the hidden layer (the notebook uses 10).
        lr: learning rate (the notebook pretrains with SGD at 0.001).
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum (the notebook uses none).
        weight_decay: L2 penalty.
    """

    task = "regression"
    """What :class:`~lightning_swag.SWAGModule` summarises for this model (read by the CLI)."""

    def __init__(
        self,
        hidden: int = 10,
        lr: float = 0.001,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(outputs, targets)


class MNISTClassifier(_ReferenceModule):
    """The notebook's MNIST net, ``784 -> hidden -> ReLU -> 10``, returning **logits**.

    The notebook applied a softmax inside the model and then ``CrossEntropyLoss`` (a double
    softmax); here ``forward`` returns logits and the loss is plain cross-entropy.

    Args:
        hidden: width of the hidden layer (the notebook uses 64).
        num_classes: number of classes.
        lr: learning rate (the notebook uses Adam at 0.001).
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
    """

    task = "classification"
    """What :class:`~lightning_swag.SWAGModule` summarises for this model (read by the CLI)."""

    def __init__(
        self,
        hidden: int = 64,
        num_classes: int = 10,
        lr: float = 0.001,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def log_eval_metrics(self, outputs: Tensor, targets: Tensor, stage: str) -> None:
        acc = (outputs.argmax(dim=-1) == targets).float().mean()
        self.log(f"{stage}_acc", acc, prog_bar=True, on_epoch=True, on_step=False)
