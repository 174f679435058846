"""The reference LightningModules: logits out, plain losses, epoch-mean training loss."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import QUIET
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag.experiments.models import MNISTClassifier, MNISTConvClassifier, SineRegressor


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


@pytest.mark.parametrize("cls", [MNISTClassifier, MNISTConvClassifier])
def test_mnist_classifiers_return_logits_and_use_cross_entropy(cls) -> None:
    torch.manual_seed(0)
    model = cls()
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


def test_the_conv_classifier_is_two_convolutions_and_a_linear_head() -> None:
    """A translation-equivariant body: a digit moved by 4 pixels (the pooling's stride) moves the
    feature maps by one cell; the head is ``net.7``."""
    torch.manual_seed(0)
    model = MNISTConvClassifier(channels=(4, 6))
    assert isinstance(model.net[7], torch.nn.Linear) and model.net[7].in_features == 6 * 7 * 7
    x = torch.zeros(1, 1, 28, 28)
    x[..., 4:12, 4:12] = torch.rand(8, 8)
    moved = torch.roll(x, shifts=(4, 4), dims=(2, 3))
    features, features_moved = model.net[:6](x), model.net[:6](moved)
    # away from the zero padding of the borders, the maps move by one cell (4 pixels / 2 poolings)
    torch.testing.assert_close(features[..., 1:5, 1:5], features_moved[..., 2:6, 2:6])
    assert not torch.allclose(features[..., 1:5, 1:5], features_moved[..., 1:5, 1:5])
