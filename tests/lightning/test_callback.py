"""SWAGCallback: schedule, checkpoint state, resume, SWA learning rate."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import QUIET, TinyRegressor, WeightRecorder, expected_moments, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_swag import SWAGCallback, SWAGModule


def _fit(callbacks, max_epochs=6, model=None, ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)
    model = model or TinyRegressor()
    kwargs = {**QUIET, **trainer_kwargs}
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model, train_dataloaders=tiny_loader(), ckpt_path=ckpt_path)
    return trainer, model


def _assert_posterior_equals(post, snapshots, max_rank):
    mean, var, rows = expected_moments(snapshots, max_rank)
    assert post.num_snapshots == len(snapshots)
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(post.variance, var, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(post.deviations.double(), rows, rtol=1e-5, atol=1e-6)


def test_epoch_schedule_collects_the_right_epochs() -> None:
    swag, recorder = SWAGCallback(start_epoch=2, every_n_epochs=2, max_rank=2), WeightRecorder()
    _fit([swag, recorder], max_epochs=9)
    expected = [recorder.by_epoch[e] for e in (2, 4, 6, 8)]
    _assert_posterior_equals(swag.posterior, expected, max_rank=2)


def test_step_schedule_with_gradient_accumulation() -> None:
    swag, recorder = SWAGCallback(every_n_steps=3, max_rank=4), WeightRecorder()
    # 4 batches per epoch, accumulate 2 -> 2 optimizer steps per epoch, 10 steps in 5 epochs
    _fit([swag, recorder], max_epochs=5, accumulate_grad_batches=2)
    expected = [recorder.by_step[s] for s in (3, 6, 9)]
    _assert_posterior_equals(swag.posterior, expected, max_rank=4)


def test_max_steps_mid_epoch_still_collects_that_epoch() -> None:
    swag, recorder = SWAGCallback(start_epoch=0, max_rank=3), WeightRecorder()
    _fit([swag, recorder], max_epochs=-1, max_steps=10)  # 4 batches/epoch: stops inside epoch 2
    assert sorted(recorder.by_epoch) == [0, 1, 2]
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in (0, 1, 2)], max_rank=3)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"start_epoch": -1}, "start_epoch"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_epochs": 2, "every_n_steps": 2}, "mutually exclusive"),
        ({"max_rank": -3}, "max_rank"),
        ({"max_rank": 2.5}, "max_rank"),
        ({"swa_lr": -0.1}, "swa_lr"),
        ({"deviation_dtype": "int8"}, "deviation_dtype"),
        ({"include": []}, "include"),
        ({"annealing_strategy": "step"}, "annealing_strategy"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        SWAGCallback(**kwargs)


def test_posterior_before_fit_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="trainer.fit"):
        _ = SWAGCallback().posterior


def test_no_snapshot_gives_a_clear_error_in_swag_module() -> None:
    swag = SWAGCallback(start_epoch=10)
    _, model = _fit([swag], max_epochs=2)
    assert swag.num_snapshots == 0
    with pytest.raises(RuntimeError, match="no posterior yet.*start_epoch"):
        SWAGModule(model, swag.posterior)


def test_resume_continues_the_same_posterior(tmp_path) -> None:
    """An interrupted run resumed from its epoch checkpoint equals the uninterrupted run."""
    full = SWAGCallback(start_epoch=1, max_rank=3)
    _fit([full], max_epochs=8)

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = SWAGCallback(start_epoch=1, max_rank=3)
    _fit([first, ckpt], max_epochs=5, enable_checkpointing=True)
    assert first.posterior.num_snapshots == 4

    resumed = SWAGCallback(start_epoch=1, max_rank=3)
    _fit([resumed], max_epochs=8, ckpt_path=tmp_path / "epoch=4.ckpt")
    assert resumed.posterior.num_snapshots == full.posterior.num_snapshots == 7
    torch.testing.assert_close(resumed.posterior.mean, full.posterior.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(resumed.posterior.variance, full.posterior.variance, rtol=0, atol=1e-12)
    torch.testing.assert_close(resumed.posterior.deviations, full.posterior.deviations, rtol=0, atol=1e-6)


def test_resume_from_checkpoint_without_swag_state_warns(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="plain")
    _fit([ckpt], max_epochs=2, enable_checkpointing=True)
    swag = SWAGCallback(max_rank=2)
    with pytest.warns(UserWarning, match="no SWAG state"):
        _fit([swag], max_epochs=4, ckpt_path=tmp_path / "plain.ckpt")
    assert swag.posterior.num_snapshots == 2  # epochs 2 and 3 only, a fresh posterior


def test_predict_restores_posterior_from_training_checkpoint(tmp_path) -> None:
    swag = SWAGCallback(start_epoch=1, max_rank=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer, model = _fit([swag, ckpt], max_epochs=5, enable_checkpointing=True)

    expected = SWAGModule(model, swag.posterior, num_samples=8, seed=3)
    expected_out = L.Trainer(**QUIET).predict(expected, tiny_loader())

    torch.manual_seed(123)
    fresh = TinyRegressor()  # different weights: everything must come from the checkpoint
    restored = SWAGModule(fresh, posterior=None, num_samples=8, seed=3)
    out = L.Trainer(**QUIET).predict(restored, tiny_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert restored.posterior.num_snapshots == 4
    for a, b in zip(out, expected_out, strict=True):
        torch.testing.assert_close(a["mean"], b["mean"])
        torch.testing.assert_close(a["std"], b["std"])


def test_swa_lr_switches_the_learning_rate_at_start_epoch() -> None:
    lrs: dict[int, float] = {}

    class LRRecorder(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    swag = SWAGCallback(start_epoch=3, swa_lr=0.2, max_rank=2)
    _fit([swag, LRRecorder()], max_epochs=6, model=TinyRegressor(lr=0.01))
    assert [lrs[e] for e in range(3)] == [0.01, 0.01, 0.01]
    assert [lrs[e] for e in range(3, 6)] == pytest.approx([0.2, 0.2, 0.2])


def test_default_leaves_the_optimizer_alone() -> None:
    lrs = []

    class LRRecorder(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _fit([SWAGCallback(), LRRecorder()], max_epochs=3, model=TinyRegressor(lr=0.01))
    assert lrs == [0.01, 0.01, 0.01]


def test_device_and_dtypes_are_configurable() -> None:
    swag = SWAGCallback(max_rank=2, device="cpu", moment_dtype="float32", deviation_dtype="bfloat16")
    _fit([swag], max_epochs=3)
    post = swag.posterior
    assert post.device == torch.device("cpu")
    assert post.moment_dtype == torch.float32 and post.deviation_dtype == torch.bfloat16


def test_a_callback_reused_in_the_same_trainer_keeps_collecting() -> None:
    swag, recorder = SWAGCallback(max_rank=4), WeightRecorder()
    trainer, model = _fit([swag, recorder], max_epochs=3)
    first_posterior = swag.posterior
    trainer.fit_loop.max_epochs = 5
    trainer.fit(model, train_dataloaders=tiny_loader())
    assert swag.posterior is first_posterior
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in range(5)], max_rank=4)


def test_a_callback_reused_in_a_new_trainer_starts_a_fresh_posterior() -> None:
    """The natural MultiSWAG loop: one callback, one new Trainer per run; the runs must not mix."""
    swag = SWAGCallback(max_rank=4)
    posteriors, snapshots = [], []
    for seed in (0, 1, 2):
        recorder = WeightRecorder()
        torch.manual_seed(seed)
        L.Trainer(max_epochs=3, callbacks=[swag, recorder], **QUIET).fit(
            TinyRegressor(), train_dataloaders=tiny_loader()
        )
        posteriors.append(swag.posterior)
        snapshots.append([recorder.by_epoch[e] for e in range(3)])
    assert len({id(p) for p in posteriors}) == 3
    for post, recorded in zip(posteriors, snapshots, strict=True):
        _assert_posterior_equals(post, recorded, max_rank=4)  # each run's own, untouched by the later ones


def test_a_callback_reused_in_a_new_trainer_resuming_a_checkpoint_continues_it(tmp_path) -> None:
    swag, recorder = SWAGCallback(max_rank=4), WeightRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    _fit([swag, recorder, ckpt], max_epochs=3, enable_checkpointing=True)
    _fit([swag, recorder], max_epochs=5, ckpt_path=tmp_path / "last.ckpt")
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in range(5)], max_rank=4)


class LazyRegressor(TinyRegressor):
    """Its first layer learns its input size on the first forward pass (``nn.LazyLinear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_uninitialized_parameters_are_tracked_once_materialized() -> None:
    swag, recorder = SWAGCallback(max_rank=3), WeightRecorder()
    _fit([swag, recorder], max_epochs=4, model=LazyRegressor())
    assert swag.posterior.param_shapes["net.0.weight"] == (8, 4)
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[e] for e in range(4)], max_rank=3)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoints_name_the_file(tmp_path, damage: str) -> None:
    swag = SWAGCallback(max_rank=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="good")
    _fit([swag, ckpt], max_epochs=2, enable_checkpointing=True)
    data = (tmp_path / "good.ckpt").read_bytes()
    content = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 50}
    bad = tmp_path / f"{damage}.ckpt"
    bad.write_bytes(content[damage])
    with pytest.raises(ValueError, match=rf"{damage}.ckpt.*not a readable checkpoint"):
        _fit([SWAGCallback(max_rank=2)], max_epochs=3, ckpt_path=bad)
    with pytest.raises(ValueError, match=rf"{damage}.ckpt.*not a readable checkpoint"):
        L.Trainer(**QUIET).predict(SWAGModule(TinyRegressor()), tiny_loader(), ckpt_path=bad)


def test_restoring_a_checkpoint_over_given_posteriors_warns(tmp_path) -> None:
    swag = SWAGCallback(start_epoch=1, max_rank=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    _, model = _fit([swag, ckpt], max_epochs=4, enable_checkpointing=True)
    other = SWAGCallback(max_rank=2)
    _fit([other], max_epochs=2)
    bma = SWAGModule(model, other.posterior, num_samples=3, seed=0)
    with pytest.warns(UserWarning, match="replaces the posterior"):
        L.Trainer(**QUIET).predict(bma, tiny_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert bma.posterior.num_snapshots == swag.posterior.num_snapshots == 3


def test_swa_lr_annealing_continues_exactly_after_resume(tmp_path) -> None:
    """SWALR's state rides in the checkpoint: a resume mid-annealing gives the same learning rates
    and the same posterior as the uninterrupted run."""

    class LRRecorder(L.Callback):
        def __init__(self) -> None:
            self.lrs: dict[int, float] = {}

        def on_train_epoch_start(self, trainer, pl_module):
            self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    def swag() -> SWAGCallback:
        return SWAGCallback(start_epoch=2, swa_lr=0.2, annealing_epochs=4, max_rank=3)

    def model() -> TinyRegressor:
        torch.manual_seed(0)  # the same initial weights in every run
        return TinyRegressor(lr=0.01)

    full, full_lrs = swag(), LRRecorder()
    _fit([full, full_lrs], max_epochs=9, model=model())

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit([swag(), ckpt], max_epochs=4, model=model(), enable_checkpointing=True)
    resumed, resumed_lrs = swag(), LRRecorder()
    _fit(
        [resumed, resumed_lrs],
        max_epochs=9,
        model=model(),
        ckpt_path=tmp_path / "epoch=3.ckpt",
    )
    assert len({round(lr, 6) for lr in full_lrs.lrs.values()}) > 3  # really annealing
    for epoch in range(4, 9):
        assert resumed_lrs.lrs[epoch] == pytest.approx(full_lrs.lrs[epoch], rel=1e-9), epoch
    torch.testing.assert_close(resumed.posterior.mean, full.posterior.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(resumed.posterior.deviations, full.posterior.deviations, rtol=0, atol=1e-6)


class EveryThirdStepFromTheFirst(SWAGCallback):
    """A user schedule written the way Lightning's WeightAveraging documents it."""

    def should_update(self, step_idx=None, epoch_idx=None):
        return step_idx is not None and step_idx % 3 == 0


class Epochs0And2(SWAGCallback):
    def should_update(self, step_idx=None, epoch_idx=None):
        return epoch_idx in (0, 2)


def test_should_update_follows_lightnings_weight_averaging_convention() -> None:
    """should_update(step_idx=..., epoch_idx=...) gets zero-based indices: step_idx = global_step - 1."""
    swag, recorder = EveryThirdStepFromTheFirst(max_rank=3), WeightRecorder()
    _fit([swag, recorder], max_epochs=2)  # 4 batches per epoch: global steps 1..8
    snapshots = [recorder.by_step[step] for step in (1, 4, 7)]  # step_idx 0, 3, 6
    _assert_posterior_equals(swag.posterior, snapshots, max_rank=3)

    swag, recorder = Epochs0And2(max_rank=3), WeightRecorder()
    _fit([swag, recorder], max_epochs=4)
    _assert_posterior_equals(swag.posterior, [recorder.by_epoch[0], recorder.by_epoch[2]], max_rank=3)


class StepsAndEpochs(SWAGCallback):
    def should_update(self, step_idx=None, epoch_idx=None):
        return True


def test_a_step_and_an_epoch_end_together_give_one_snapshot() -> None:
    swag, recorder = StepsAndEpochs(max_rank=3), WeightRecorder()
    _fit([swag, recorder], max_epochs=2)
    _assert_posterior_equals(swag.posterior, [recorder.by_step[s] for s in range(1, 9)], max_rank=3)


# ---------------------------------------------------------------------- issue 25: errors and lifetime


class _StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


def test_an_include_that_matches_nothing_is_an_error_when_fit_starts() -> None:
    counter = _StepCounter()
    swag = SWAGCallback(start_epoch=3, include=["hed.*"])
    with pytest.raises(ValueError, match=r"SWAGCallback: include=\['hed\.\*'\] matches no parameter") as err:
        _fit([swag, counter], max_epochs=5)
    assert "net.0.weight" in str(err.value)  # it lists names to choose from
    assert counter.steps == 0  # not after the pre-training epochs


def test_an_include_of_a_frozen_module_unfrozen_before_the_first_snapshot_is_accepted() -> None:
    class Unfreeze(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            pl_module.net[2].requires_grad_(trainer.current_epoch >= 1)

    torch.manual_seed(0)
    model = TinyRegressor()
    model.net[2].requires_grad_(False)
    swag = SWAGCallback(start_epoch=1, include=["net.2.*"])
    _fit([Unfreeze(), swag], max_epochs=3, model=model)
    assert swag.posterior.param_names == ["net.2.weight", "net.2.bias"]


def test_a_fitted_callback_pickles_without_the_module_and_does_not_keep_it_alive() -> None:
    import gc
    import pickle
    import weakref

    class LocalRegressor(TinyRegressor):  # a class local to a function cannot be pickled
        pass

    torch.manual_seed(0)
    swag = SWAGCallback(start_epoch=1, max_rank=2)
    trainer, model = _fit([swag], max_epochs=3, model=LocalRegressor())
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(model)
    restored = pickle.loads(pickle.dumps(swag))
    assert torch.equal(restored.posterior.mean, swag.posterior.mean)
    assert "log" not in vars(restored) and "log_dict" not in vars(restored)

    module = weakref.ref(model)
    del trainer, model
    gc.collect()
    assert module() is None
    assert swag.posterior.num_snapshots == 2  # the posterior outlives the module
