"""The reference LightningModules: logits out, plain losses, epoch-mean training loss."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import QUIET
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag.experiments.models import MNISTClassifier, SineRegressor


def test_train_loss_is_the_epoch_mean_of_the_step_losses() -> None:
    losses: list[tuple[float, int]] = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(outputs["loss"]), len(batch[1])))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, generator=g), torch.randn(50, 1, generator=g)
    trainer = L.Trainer(max_epochs=1, callbacks=[Recorder()], **QUIET)
    torch.manual_seed(0)
    trainer.fit(SineRegressor(lr=0.01), DataLoader(TensorDataset(x, y), batch_size=16))
    expected = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(expected, rel=1e-6)


def test_mnist_classifier_returns_logits_and_uses_cross_entropy() -> None:
    torch.manual_seed(0)
    model = MNISTClassifier()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert logits.shape == (4, 10)
    assert not torch.allclose(logits.sum(-1), torch.ones(4))  # not probabilities
    torch.testing.assert_close(model.loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
    assert model.predict_step((x, y), 0).shape == (4, 10)


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"optimizer": "rmsprop"}])
def test_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SineRegressor(**kwargs)
