"""The SWA learning rate: annealing as its formula says, continued exactly on resume, user schedulers set aside."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_swag.lightning.swa_lr import SWALRSchedule


def _trainer(*lrs: float, schedulers: list | None = None, automatic: bool = True) -> SimpleNamespace:
    """The parts of a Trainer the schedule reads: optimizers, scheduler configs, the optimization mode."""
    optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr) for lr in lrs]
    configs = list(schedulers or [])
    strategy = SimpleNamespace(lr_scheduler_configs=configs)
    return SimpleNamespace(
        optimizers=optimizers,
        lr_scheduler_configs=configs,
        strategy=strategy,
        lightning_module=SimpleNamespace(automatic_optimization=automatic),
    )


def _epoch(trainer: SimpleNamespace, schedule: SWALRSchedule) -> None:
    """One training epoch: the optimizers step, then the schedule (as the callback does at the epoch end)."""
    for optimizer in trainer.optimizers:
        optimizer.step()
    schedule.step()


def _lrs(trainer: SimpleNamespace) -> list[float]:
    return [opt.param_groups[0]["lr"] for opt in trainer.optimizers]


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_annealing_moves_every_optimizer_from_its_lr_to_swa_lr(strategy) -> None:
    trainer = _trainer(1.0, 0.5)
    schedule = SWALRSchedule(swa_lr=0.1, annealing_epochs=4, annealing_strategy=strategy)
    assert not schedule.installed
    schedule.install(trainer)
    assert schedule.installed and len(schedule.schedulers) == 2
    seen = [_lrs(trainer)]
    for _ in range(5):
        _epoch(trainer, schedule)
        seen.append(_lrs(trainer))
    for index, start in enumerate((1.0, 0.5)):
        lrs = [row[index] for row in seen]
        for epoch, lr in enumerate(lrs[:5]):
            t = min(1.0, epoch / 4)
            weight = (1 - math.cos(math.pi * t)) / 2 if strategy == "cos" else t
            assert lr == pytest.approx(start + weight * (0.1 - start), rel=1e-6), (epoch, lrs)
        assert lrs[4] == lrs[5] == pytest.approx(0.1)  # annealed: held at swa_lr
        assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_resume_continues_the_saved_annealing_exactly() -> None:
    trainer = _trainer(1.0)
    schedule = SWALRSchedule(0.2, 5, "cos")
    schedule.install(trainer)
    _epoch(trainer, schedule)
    _epoch(trainer, schedule)
    saved, saved_lrs = schedule.state_dict(), _lrs(trainer)
    reference = []
    for _ in range(4):
        _epoch(trainer, schedule)
        reference.append(_lrs(trainer)[0])
    # a new run: the checkpoint's optimizer holds the interrupted run's learning rate
    resumed_trainer = _trainer(1.0)
    resumed_trainer.optimizers[0].param_groups[0]["lr"] = saved_lrs[0]
    resumed = SWALRSchedule(0.2, 5, "cos")
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved and not resumed.installed
    resumed.install(resumed_trainer)
    assert _lrs(resumed_trainer) == saved_lrs
    continued = []
    for _ in range(4):
        _epoch(resumed_trainer, resumed)
        continued.append(_lrs(resumed_trainer)[0])
    assert continued == pytest.approx(reference, rel=1e-12)


def test_a_state_for_other_optimizers_starts_afresh_and_reset_forgets() -> None:
    trainer = _trainer(1.0, 1.0)
    schedule = SWALRSchedule(0.2, 3, "linear")
    schedule.load_state_dict([{"unused": 0}])  # one saved state, two optimizers: not a resume
    schedule.install(trainer)
    assert len(schedule.schedulers) == 2 and _lrs(trainer) == [1.0, 1.0]
    schedule.reset()
    assert not schedule.installed and schedule.state_dict() == []


def test_user_schedulers_are_removed_under_automatic_optimization_and_kept_with_a_warning_under_manual() -> (
    None
):
    automatic = _trainer(1.0, schedulers=["user scheduler"])
    SWALRSchedule(0.1, 0, "cos").install(automatic)
    assert automatic.strategy.lr_scheduler_configs == []
    manual = _trainer(1.0, schedulers=["user scheduler"], automatic=False)
    with pytest.warns(UserWarning, match="under manual optimization your training_step steps its own LR"):
        SWALRSchedule(0.1, 0, "cos").install(manual)
    assert manual.strategy.lr_scheduler_configs == ["user scheduler"]
