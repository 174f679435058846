"""``quiet_lightning``: the CLI's and the examples' runs show no Lightning banners unless
``LIGHTNING_SWAG_VERBOSE`` asks for them, and leave logging and warnings as they found them."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
from conftest import TinyRegressor, tiny_loader

from lightning_swag.lightning.quiet import VERBOSE_ENV, quiet_lightning

BANNERS = ("GPU available", "TPU available", "Seed set to")


def fit_and_capture(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> str:
    """What a one-epoch fit prints and logs (pytest takes the log records Lightning would print)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # records whatever the loggers let through
        L.seed_everything(0)
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(TinyRegressor(), tiny_loader())
    captured = capfd.readouterr()
    return captured.out + captured.err + caplog.text


def test_quiet_runs_show_no_banners_and_restore_logging(capfd, caplog, monkeypatch) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    level = logging.getLogger("lightning.pytorch").level
    filters = list(warnings.filters)
    with quiet_lightning():
        out = fit_and_capture(capfd, caplog)
    assert not any(banner in out for banner in BANNERS), out
    assert logging.getLogger("lightning.pytorch").level == level and warnings.filters == filters


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_environment_gives_lightnings_output_back(capfd, caplog, monkeypatch, value: str) -> None:
    monkeypatch.setenv(VERBOSE_ENV, value)
    with quiet_lightning():
        out = fit_and_capture(capfd, caplog)
    assert all(banner in out for banner in BANNERS), out


def caught(examples: bool) -> list[warnings.WarningMessage]:
    message = "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_lightning(examples=examples):
            warnings.warn(message, UserWarning, stacklevel=1)
    return seen


def test_warnings_about_the_examples_set_up_are_hidden_only_for_examples(monkeypatch) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not caught(examples=True)
    assert len(caught(examples=False)) == 1  # the CLI: about the user's own model, so shown
