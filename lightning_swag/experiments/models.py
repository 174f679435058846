"""Reference LightningModules of the experiments (sine regression, MNIST classification, and
regression with a learned noise model).

They are ordinary LightningModules: nothing in them knows about SWAG. ``forward`` returns raw
outputs (regression values, ``(mean, log-variance)`` pairs, or logits for classification), which
is what :class:`SWAGModule` expects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_swag.likelihoods.summaries import heteroscedastic_mean_variance
from lightning_swag.predictive.batches import default_batch_inputs, default_batch_targets

OptimizerName = Literal["sgd", "adam"]


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
        inputs, targets = default_batch_inputs(batch), default_batch_targets(batch)
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

    @override
    def on_train_epoch_start(self) -> None:
        self._train_loss_sum: Tensor | float = 0.0
        self._train_count = 0

    @override
    def on_train_epoch_end(self) -> None:
        if self._train_count:
            mean = torch.as_tensor(self._train_loss_sum, dtype=torch.float32) / self._train_count
            self.log("train_loss", mean, sync_dist=True)

    def log_eval_metrics(self, outputs: Tensor, targets: Tensor, stage: str) -> None:
        """Hook for extra validation/test metrics; the default logs nothing."""

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Raw outputs for the inputs of a ``(inputs, targets)`` batch or of a bare input tensor."""
        return self(default_batch_inputs(batch))

    @override
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

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(outputs, targets)


def gaussian_nll_from_log_variance(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood (nats, with the ``log 2π`` constant) of ``targets``
    under ``N(outputs[..., 0], exp(outputs[..., 1]))``.

    Written with the log-variance directly, ``½ (log 2π + s + (y − μ)² e^{-s})``, so no variance is
    exponentiated and logged back; it equals ``torch.nn.GaussianNLLLoss(full=True)`` with
    ``var = exp(s)``. ``targets`` may carry a trailing dimension of 1 (``[B, 1]`` for ``[B, 2]`` outputs).
    """
    mean, _ = heteroscedastic_mean_variance(outputs)
    log_variance = outputs[..., 1]
    if targets.numel() != mean.numel():
        raise ValueError(
            f"targets must hold one value per predicted mean: outputs {tuple(outputs.shape)} give means "
            f"{tuple(mean.shape)}, got targets {tuple(targets.shape)}."
        )
    residual = targets.reshape(mean.shape) - mean
    return 0.5 * (math.log(2 * math.pi) + log_variance + residual.square() * torch.exp(-log_variance)).mean()


class GaussianRegressor(_ReferenceModule):
    """An MLP that predicts a Gaussian per input: ``forward`` returns ``[B, 2]`` = (mean, log-variance).

    Trained with the Gaussian negative log-likelihood (:func:`gaussian_nll_from_log_variance`), so
    the network learns input-dependent (heteroscedastic) noise. Its output layout is the one of
    ``SWAGModule(noise="heteroscedastic")``. Used for the heteroscedastic sine data
    (``in_features=1``) and for tabular data such as scikit-learn's diabetes (``in_features=10``).

    Args:
        in_features: input dimension.
        hidden: widths of the hidden layers.
        activation: ``"relu"`` or ``"tanh"``.
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        init_log_variance: initial bias of the log-variance output (0: unit variance, right for
            standardised targets).
        lr_schedule: ``"constant"``, or ``"cosine"``: anneal from ``lr`` to ``lr / 100`` over the
            Trainer's ``max_epochs`` (a converged point estimate; set the attribute back to
            ``"constant"`` before a SWAG collection run).
    """

    task = "regression"
    """What :class:`~lightning_swag.SWAGModule` summarises for this model (read by the CLI)."""
    noise = "heteroscedastic"
    """The noise model of ``SWAGModule`` that matches the output layout."""

    def __init__(
        self,
        in_features: int = 1,
        hidden: Sequence[int] = (50, 50),
        activation: Literal["relu", "tanh"] = "relu",
        lr: float = 0.001,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        init_log_variance: float = 0.0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}.")
        hidden = list(hidden)
        if not hidden or not all(isinstance(h, int) and h >= 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of ints >= 1, got {hidden!r}.")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}.")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")
        self.save_hyperparameters()
        self.lr_schedule = lr_schedule
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU() if activation == "relu" else nn.Tanh()]
            width = h
        head = nn.Linear(width, 2)
        with torch.no_grad():
            head.bias[1].fill_(init_log_variance)
        self.net = nn.Sequential(*layers, head)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return gaussian_nll_from_log_variance(outputs, targets)

    @override
    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if self.lr_schedule == "constant":
            return optimizer
        epochs = max(1, int(self.trainer.max_epochs or 1))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=self.lr / 100)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def log_eval_metrics(self, outputs: Tensor, targets: Tensor, stage: str) -> None:
        mean, _ = heteroscedastic_mean_variance(outputs)
        rmse = (mean - targets.reshape(mean.shape)).square().mean().sqrt()
        self.log(f"{stage}_rmse", rmse, prog_bar=True, on_epoch=True, on_step=False)


class DigitClassifier(_ReferenceModule):
    """What the MNIST classifiers share: logits out, cross-entropy, accuracy logged; ``self.net`` is
    the subclass's."""

    task = "classification"
    """What :class:`~lightning_swag.SWAGModule` summarises for this model (read by the CLI)."""

    net: nn.Module

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def log_eval_metrics(self, outputs: Tensor, targets: Tensor, stage: str) -> None:
        acc = (outputs.argmax(dim=-1) == targets).float().mean()
        self.log(f"{stage}_acc", acc, prog_bar=True, on_epoch=True, on_step=False)


class MNISTClassifier(DigitClassifier):
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


class MNISTConvClassifier(DigitClassifier):
    """A small convolutional MNIST net, returning **logits**: two 3×3 convolutions (``channels``
    wide, each followed by ReLU and 2×2 max-pooling), then a linear head ``net.7`` on the 7×7 maps.

    Args:
        channels: widths of the two convolutions.
        num_classes: number of classes.
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
    """

    def __init__(
        self,
        channels: tuple[int, int] = (8, 16),
        num_classes: int = 10,
        lr: float = 0.001,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        self.save_hyperparameters()
        first, second = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(second * 7 * 7, num_classes),
        )
