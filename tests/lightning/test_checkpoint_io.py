"""The weights-only checkpoint IO: tensors load, pickled objects are refused, damaged files are named."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_swag.lightning.checkpoint_io import (
    WeightsOnlyCheckpointIO,
    readable_checkpoint_errors,
    restore_checkpoint_io,
)
from lightning_swag.posterior.format import UnsafeFileError


class Pickled:
    """A plain Python object: loading it needs unpickling."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_tensors_round_trip_and_pickled_objects_are_refused_unless_trusted(tmp_path: Path) -> None:
    io = WeightsOnlyCheckpointIO(TorchCheckpointIO())
    plain = tmp_path / "plain.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "epoch": 2}, plain)
    loaded = io.load_checkpoint(plain)
    assert loaded["epoch"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    unsafe = tmp_path / "unsafe.ckpt"
    io.save_checkpoint({"hyper_parameters": {"thing": Pickled(4)}}, unsafe)
    with pytest.raises(
        UnsafeFileError, match=r"(?s)unsafe\.ckpt.*Pickled.*pass weights_only=False to trainer.fit"
    ):
        io.load_checkpoint(unsafe)
    assert io.load_checkpoint(unsafe, weights_only=False)["hyper_parameters"]["thing"].value == 4


def test_damaged_and_missing_files(tmp_path: Path) -> None:
    io = WeightsOnlyCheckpointIO(TorchCheckpointIO())
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="damaged.ckpt") as info:
        io.load_checkpoint(damaged)
    assert not isinstance(info.value, UnsafeFileError)
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")


def test_the_inner_io_does_the_work() -> None:
    calls: list[tuple] = []

    class Recording(TorchCheckpointIO):
        def load_checkpoint(self, path, map_location=None, weights_only=None):
            calls.append(("load", path, weights_only))
            return {}

        def remove_checkpoint(self, path) -> None:
            calls.append(("remove", path))

        def teardown(self) -> None:
            calls.append(("teardown",))

    io = WeightsOnlyCheckpointIO(Recording())
    io.load_checkpoint("a.ckpt")
    io.load_checkpoint("b.ckpt", weights_only=False)
    io.remove_checkpoint("a.ckpt")
    io.teardown()
    assert calls == [("load", "a.ckpt", True), ("load", "b.ckpt", False), ("remove", "a.ckpt"), ("teardown",)]


def test_wrapping_a_strategys_io_once_and_putting_it_back() -> None:
    inner = TorchCheckpointIO()
    strategy = SimpleNamespace(checkpoint_io=inner)
    readable_checkpoint_errors(strategy)  # type: ignore[arg-type]
    wrapped = strategy.checkpoint_io
    assert isinstance(wrapped, WeightsOnlyCheckpointIO) and wrapped.inner is inner
    readable_checkpoint_errors(strategy)  # type: ignore[arg-type]
    assert strategy.checkpoint_io is wrapped  # never wrapped twice
    restore_checkpoint_io(strategy)  # type: ignore[arg-type]
    assert strategy.checkpoint_io is inner
    restore_checkpoint_io(strategy)  # type: ignore[arg-type]
    assert strategy.checkpoint_io is inner
