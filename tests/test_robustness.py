"""SWAGCallback / SWAGPosterior under awkward conditions: another architecture, more rank than
snapshots, gradient accumulation, max_steps, validation or none, two optimizers with manual
optimization, and diverging (NaN) weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import QUIET, TinyRegressor, WeightRecorder, expected_moments, tiny_loader
from torch import nn

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior


def _fit(callbacks, make=TinyRegressor, loader=None, val_loader=None, **trainer_kwargs):
    """Seed, build ``make()`` and fit it on the tiny regression data."""
    torch.manual_seed(0)
    model = make()
    kwargs = {**QUIET, "max_epochs": 4, **trainer_kwargs}
    trainer = L.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, train_dataloaders=loader or tiny_loader(), val_dataloaders=val_loader)
    return trainer, model


def _assert_posterior_equals(post: SWAGPosterior, snapshots: list[torch.Tensor], max_rank: int) -> None:
    mean, var, rows = expected_moments(snapshots, max_rank)
    assert post.num_snapshots == len(snapshots)
    assert post.rank == min(len(snapshots), max_rank)
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(post.variance, var, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(post.deviations.double(), rows, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- architecture mismatch


def test_posterior_applied_to_another_architecture_is_a_clear_error() -> None:
    swag = SWAGCallback(max_rank=2)
    trainer, _ = _fit([swag], max_epochs=3)
    post = swag.posterior

    wider = TinyRegressor(hidden=16)
    with pytest.raises(ValueError, match=r"does not match TinyRegressor.*net\.0\.weight: model \(16, 4\)"):
        SWAGModule(wider, post)
    with pytest.raises(ValueError, match="does not match"):
        post.load_into(wider)
    with pytest.raises(ValueError, match=r"'net\.0\.weight' has shape \(16, 4\).*another architecture"):
        post.collect(wider)
    assert post.num_snapshots == 3  # nothing was added

    other = nn.Sequential(nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"missing parameters \['net\.0\.weight'"):
        SWAGModule(other, post)
    with pytest.raises(KeyError, match="another architecture"):
        post.collect(other)

    # continuing the same Trainer's posterior with another model is caught at train start
    trainer.fit_loop.max_epochs = 4
    with pytest.raises(ValueError, match="does not match"):
        trainer.fit(TinyRegressor(hidden=16), train_dataloaders=tiny_loader())


# ---------------------------------------------------------------------- rank vs snapshots


def test_max_rank_larger_than_the_number_of_snapshots() -> None:
    swag, recorder = SWAGCallback(start_epoch=1, max_rank=10), WeightRecorder()
    _, model = _fit([swag, recorder], max_epochs=4)  # 3 snapshots
    post = swag.posterior
    assert post.rank == 3 and post.deviations.shape == (3, post.num_params)
    _assert_posterior_equals(post, [recorder.by_epoch[e] for e in (1, 2, 3)], max_rank=10)

    samples = post.sample(500, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (500, post.num_params) and torch.isfinite(samples).all()
    var, low_rank = post.covariance_factors()
    assert low_rank is not None and low_rank.shape == (3, post.num_params)
    out = L.Trainer(**QUIET).predict(SWAGModule(model, post, num_samples=4, seed=0), tiny_loader())
    assert out[0]["mean"].shape == (16, 1) and torch.isfinite(out[0]["std"]).all()


# ---------------------------------------------------------------------- training-loop variants


def test_epoch_mode_with_gradient_accumulation() -> None:
    # 4 batches per epoch, accumulate 3: steps after batches 3 and 4 (the partial window at epoch end)
    swag, recorder = SWAGCallback(max_rank=3), WeightRecorder()
    trainer, _ = _fit([swag, recorder], max_epochs=3, accumulate_grad_batches=3)
    assert trainer.global_step == 6
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in range(3)], max_rank=3)


@pytest.mark.parametrize(
    "max_steps, epochs",
    [(8, [0, 1]), (10, [0, 1, 2])],
    ids=["ends-on-an-epoch-boundary", "ends-mid-epoch"],
)
def test_epoch_mode_with_max_steps(max_steps, epochs) -> None:
    swag, recorder = SWAGCallback(max_rank=3), WeightRecorder()
    trainer, _ = _fit([swag, recorder], max_epochs=-1, max_steps=max_steps)
    assert trainer.global_step == max_steps and sorted(recorder.by_epoch) == epochs
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in epochs], max_rank=3)


def test_step_mode_with_max_steps() -> None:
    swag, recorder = SWAGCallback(every_n_steps=3, max_rank=2), WeightRecorder()
    _fit([swag, recorder], max_epochs=-1, max_steps=10)
    _assert_posterior_equals(swag.posterior, [recorder.by_step[s] for s in (3, 6, 9)], max_rank=2)


class ValidatedRegressor(TinyRegressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))


@pytest.mark.parametrize(
    "model_cls, trainer_kwargs",
    [
        (TinyRegressor, {}),
        (ValidatedRegressor, {}),
        (ValidatedRegressor, {"val_check_interval": 0.5, "num_sanity_val_steps": 2}),
        (ValidatedRegressor, {"limit_val_batches": 0}),
        (ValidatedRegressor, {"check_val_every_n_epoch": 2}),
    ],
    ids=["no-validation", "validation", "mid-epoch-validation", "validation-disabled", "validation-every-2"],
)
def test_validation_loop_or_none_gives_the_same_posterior(model_cls, trainer_kwargs) -> None:
    swag, recorder = SWAGCallback(max_rank=3), WeightRecorder()
    val_loader = tiny_loader(n=32, seed=5) if model_cls is ValidatedRegressor else None
    _fit([swag, recorder], make=model_cls, val_loader=val_loader, **trainer_kwargs)
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in range(4)], max_rank=3)

    reference = SWAGCallback(max_rank=3)
    _fit([reference])  # the plain run: validation never changes what is collected
    assert torch.equal(swag.posterior.mean, reference.posterior.mean)
    assert torch.equal(swag.posterior.deviations, reference.posterior.deviations)


class TwoOptimizerModel(L.LightningModule):
    """Manual optimization with two optimizers (GAN-style alternation on two sub-networks)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_encoder, opt_head = self.optimizers()
        for opt in (opt_encoder, opt_head):
            loss = nn.functional.mse_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.encoder.parameters(), lr=0.05),
            torch.optim.Adam(self.head.parameters(), lr=0.01),
        )


def test_two_optimizers_manual_optimization_epoch_mode() -> None:
    swag, recorder = SWAGCallback(start_epoch=1, max_rank=3), WeightRecorder()
    trainer, model = _fit([swag, recorder], make=TwoOptimizerModel, max_epochs=4)
    assert trainer.global_step == 2 * 4 * 4  # both optimizers' steps count
    assert swag.posterior.param_names == [n for n, _ in model.named_parameters()]
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in (1, 2, 3)], max_rank=3)


def test_two_optimizers_manual_optimization_step_mode() -> None:
    # global_step advances by 2 per batch and every optimizer step counts: every_n_steps=3 fires at
    # steps 3, 6, 9, ..., the odd ones in the middle of a batch (the weights right after that step).
    swag3, rec3 = SWAGCallback(every_n_steps=3, max_rank=4), WeightRecorder()
    _fit([swag3, rec3], make=TwoOptimizerModel, max_epochs=3)
    assert sorted(rec3.by_step) == list(range(1, 25))
    _assert_posterior_equals(swag3.posterior, [rec3.by_step[s] for s in range(3, 25, 3)], max_rank=4)

    swag4, rec4 = SWAGCallback(every_n_steps=4, max_rank=4), WeightRecorder()
    _fit([swag4, rec4], make=TwoOptimizerModel, max_epochs=3)
    _assert_posterior_equals(swag4.posterior, [rec4.by_step[s] for s in range(4, 25, 4)], max_rank=4)


# ---------------------------------------------------------------------- diverging weights


class BlowUpAt(L.Callback):
    """Sets a huge learning rate from epoch ``epoch`` on, so that the weights overflow to inf/NaN."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 1e30


def test_nan_weights_raise_naming_the_parameter_and_keep_the_posterior() -> None:
    swag, recorder = SWAGCallback(max_rank=3), WeightRecorder()
    with pytest.raises(FloatingPointError) as err:
        _fit([recorder, swag, BlowUpAt(epoch=2)], max_epochs=5)  # recorder first: it sees step 12
    message = str(err.value)
    assert "SWAGCallback at epoch 2, global step 12" in message
    assert "Snapshot 3 has NaN or infinite weights in net.0.weight" in message
    assert "not added" in message and "learning rate" in message
    assert not torch.isfinite(recorder.by_step[12]).all()  # the weights really diverged

    # the failed snapshot was not added: the posterior is that of epochs 0 and 1, intact and usable
    post = swag.posterior
    _assert_posterior_equals(post, [recorder.by_epoch[0], recorder.by_epoch[1]], max_rank=3)
    assert torch.isfinite(post.mean).all() and torch.isfinite(post.sample(3)).all()


def test_nan_from_the_first_step_in_step_mode() -> None:
    swag = SWAGCallback(every_n_steps=1, max_rank=2)
    with pytest.raises(
        FloatingPointError, match=r"global step \d+: Snapshot \d+ has NaN or infinite weights in net\."
    ):
        _fit([swag], make=lambda: TinyRegressor(lr=1e30), max_epochs=2)
    # whatever was collected before the blow-up is finite
    assert all(
        torch.isfinite(t).all()
        for t in (swag.posterior.statistics.mean, swag.posterior.statistics.deviations)
    )
