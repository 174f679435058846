"""The sine regression data of the reference notebook, and a heteroscedastic variant."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

__all__ = ["SineDataModule", "SineNoise", "noise_std", "sine_function"]

SineNoise = Literal["notebook", "heteroscedastic"]


def sine_function(x: Tensor) -> Tensor:
    """The noise-free target ``3 sin x``."""
    return 3 * torch.sin(x)


def _noise_scale(x: Tensor, noise: SineNoise) -> Tensor:
    """The factor multiplying standard-normal noise (negative in places for the notebook's)."""
    if noise == "notebook":
        return 0.7 + 2 * torch.sin(0.2 * x)
    if noise == "heteroscedastic":
        return 0.1 + 0.3 * x.abs() / 5
    raise ValueError(f"noise must be 'notebook' or 'heteroscedastic', got {noise!r}.")


def noise_std(x: Tensor, noise: SineNoise = "notebook") -> Tensor:
    """The true noise standard deviation at ``x``.

    ``"notebook"``: ``|0.7 + 2 sin 0.2x|`` (the notebook multiplies the noise by ``0.7 + 2 sin 0.2x``,
    which is negative for ``x < -1.8``; only its size matters). ``"heteroscedastic"``:
    ``0.1 + 0.3 |x| / 5``, from 0.1 at ``x = 0`` to 0.4 at ``|x| = 5``.
    """
    return _noise_scale(x, noise).abs()


class SineDataModule(L.LightningDataModule):
    """``num_points`` inputs evenly on ``[low, high]`` with ``y = 3 sin x + ε (0.7 + 2 sin 0.2x)``.

    The defaults reproduce the notebook's data exactly (500 points on [-5, 5], seed 1355);
    ``noise="heteroscedastic"`` draws ``y = 3 sin x + ε (0.1 + 0.3 |x| / 5)`` instead (noise that
    grows with ``|x|``, from the same generator, see :func:`noise_std`). The
    train loader serves the noisy points; the test loader serves a grid on the training range
    with the *true* function as target (for RMSE against the truth); the predict loader serves a
    wider grid (``predict_low``..``predict_high``) to see uncertainty outside the data.

    Args:
        num_points: training points.
        low: left end of the training range.
        high: right end of the training range.
        batch_size: training batch size (the notebook uses 16).
        seed: seed of the noise and of the shuffling (its own ``torch.Generator``).
        predict_low: left end of the prediction grid.
        predict_high: right end of the prediction grid.
        predict_points: points on the prediction grid.
        noise: ``"notebook"`` (the default) or ``"heteroscedastic"``.
    """

    def __init__(
        self,
        num_points: int = 500,
        low: float = -5.0,
        high: float = 5.0,
        batch_size: int = 16,
        seed: int = 1355,
        predict_low: float = -10.0,
        predict_high: float = 10.0,
        predict_points: int = 500,
        noise: SineNoise = "notebook",
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_points", num_points),
            ("batch_size", batch_size),
            ("predict_points", predict_points),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SineDataModule: {name} must be an int >= 1, got {value!r}.")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"SineDataModule: need low < high, got low={low}, high={high}.")
        if not predict_low < predict_high:
            raise ValueError(
                f"SineDataModule: need predict_low < predict_high, got {predict_low}, {predict_high}."
            )
        if noise not in ("notebook", "heteroscedastic"):
            raise ValueError(f"SineDataModule: noise must be 'notebook' or 'heteroscedastic', got {noise!r}.")
        self.save_hyperparameters()
        self.noise = noise
        self.batch_size = batch_size
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.linspace(low, high, num_points).unsqueeze(1)
        noise_scale = _noise_scale(self.x, noise)
        self.y = sine_function(self.x) + torch.randn(self.x.size(), generator=generator) * noise_scale
        self.test_x = torch.linspace(low, high, num_points).unsqueeze(1)
        self.predict_x = torch.linspace(predict_low, predict_high, predict_points).unsqueeze(1)
        self._shuffle_generator = torch.Generator().manual_seed(seed + 1)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=self.batch_size,
            shuffle=True,
            generator=self._shuffle_generator,
        )

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test_x, sine_function(self.test_x)), batch_size=len(self.test_x))

    @override
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.predict_x, sine_function(self.predict_x)), batch_size=len(self.predict_x)
        )

    def sample_targets(self, x: Tensor, seed: int) -> Tensor:
        """Fresh noisy targets ``3 sin x + noise`` at inputs ``x`` (e.g. a held-out test set), drawn
        from a ``torch.Generator`` seeded with ``seed`` (use a seed other than the training one)."""
        generator = torch.Generator().manual_seed(seed)
        return sine_function(x) + torch.randn(x.size(), generator=generator) * noise_std(x, self.noise)
