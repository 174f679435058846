"""The sine regression data of the reference notebook."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["SineDataModule", "sine_function"]


def sine_function(x: Tensor) -> Tensor:
    """The noise-free target ``3 sin x``."""
    return 3 * torch.sin(x)


class SineDataModule(L.LightningDataModule):
    """``num_points`` inputs evenly on ``[low, high]`` with ``y = 3 sin x + ε (0.7 + 2 sin 0.2x)``.

    The defaults reproduce the notebook's data exactly (500 points on [-5, 5], seed 1355). The
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
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.linspace(low, high, num_points).unsqueeze(1)
        noise_scale = 0.7 + 2 * torch.sin(0.2 * self.x)
        self.y = sine_function(self.x) + torch.randn(self.x.size(), generator=generator) * noise_scale
        self.test_x = torch.linspace(low, high, num_points).unsqueeze(1)
        self.predict_x = torch.linspace(predict_low, predict_high, predict_points).unsqueeze(1)
        self._shuffle_generator = torch.Generator().manual_seed(seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=self.batch_size,
            shuffle=True,
            generator=self._shuffle_generator,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test_x, sine_function(self.test_x)), batch_size=len(self.test_x))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.predict_x, sine_function(self.predict_x)), batch_size=len(self.predict_x)
        )
