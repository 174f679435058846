"""Held-out tuning of a ``SWAGModule``: the covariance scale and the noise σ, chosen on validation data.

:class:`HeldOutTuning` is the part of ``SWAGModule`` that reads labelled held-out batches
(Lightning glue over :mod:`lightning_swag.predictive.tuning`, which is plain torch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

import lightning_swag.predictive.tuning as tuning

__all__ = ["HeldOutTuning", "resolve_loader"]


class HeldOutTuning:
    """``tune_scale`` and ``fit_noise`` of :class:`~lightning_swag.SWAGModule`."""

    @torch.no_grad()
    def tune_scale(
        self,
        dataloader: Iterable[Any] | L.LightningDataModule,
        scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    ) -> dict[float, float]:
        """Set ``scale`` to the candidate with the lowest predictive negative log-likelihood on held-out data.

        The covariance scale trades calibration against sharpness, and the best value depends on
        the model and the collection learning rate; choose it on a validation set, never on the
        test set. Every candidate is scored with the same standard-normal draws (only their scale
        differs). Classification scores the NLL of the BMA probabilities; regression needs a noise
        model and scores the NLL of the predictive mixture. With a homoscedastic ``noise=σ``, σ is
        refit by maximum likelihood for every candidate (scale and σ trade off) and the best pair is
        kept.

        Args:
            dataloader: labelled held-out batches (read with :meth:`batch_inputs` and
                :meth:`batch_targets`; kept in memory while the candidates are scored), or a
                LightningDataModule whose ``val_dataloader`` is used.
            scales: candidate scales (each ``>= 0``). A warning says so when the best one is the
                largest (or the smallest non-zero) candidate.

        Returns:
            ``{scale: mean NLL}`` for every candidate.
        """
        likelihood = self._likelihood()
        batches = self._held_out(dataloader, "tune_scale")
        seed = self._current_seed()

        def predict(inputs: Any, scale: float) -> dict[str, Tensor]:
            self.scale = scale
            self._run_seed = seed
            return self._summarize(inputs, keep_samples=likelihood.needs_samples)

        scores, best, fitted = tuning.tune_scale(predict, likelihood, batches, scales)
        self.scale = best
        if "noise" in fitted:
            self.noise = fitted["noise"]
        self._run_seed = seed
        return scores

    @torch.no_grad()
    def fit_noise(self, dataloader: Iterable[Any] | L.LightningDataModule) -> float:
        """Set a homoscedastic ``noise`` σ by maximum likelihood of the predictive mixture on held-out
        data, and return it (regression; the weight samples are those of ``seed``).

        The predictive is the mixture over weight samples of ``N(mean_s(x), σ²)`` or, for
        ``predictive="linearized"`` (``link_approx="probit"``), over posteriors of
        ``N(mean_j(x), linearised variance_j(x) + σ²)``; σ maximises its likelihood of the held-out
        targets (:func:`~lightning_swag.metrics.fit_gaussian_noise`).
        Fit it on validation data, never on the test set.

        Args:
            dataloader: labelled held-out batches, or a LightningDataModule (its ``val_dataloader``).
        """
        if self.task != "regression":
            raise ValueError(f"fit_noise is for regression; this module's task is {self.task!r}.")
        if self.noise == "heteroscedastic":
            raise ValueError(
                "fit_noise fits a homoscedastic σ, but noise='heteroscedastic': the model predicts its own noise."
            )
        batches = self._held_out(dataloader, "fit_noise")
        sigma = tuning.fit_noise(self._components, batches)
        self.noise = sigma
        return sigma

    def _held_out(self, dataloader: Any, what: str) -> list[tuple[Any, Any]]:
        """The labelled batches of a loader or DataModule (its validation loader), on the model's device."""
        self._require_posteriors()
        device = next(iter(self.model.parameters())).device
        batches = [
            (
                move_data_to_device(self.batch_inputs(batch), device),
                move_data_to_device(self.batch_targets(batch), device),
            )
            for batch in resolve_loader(dataloader, "val")
        ]
        if not batches:
            raise ValueError(f"{what} got an empty dataloader.")
        return batches


def resolve_loader(source: Any, split: Literal["train", "val"]) -> Iterable[Any]:
    """A loader, or a DataModule's training / validation loader."""
    if isinstance(source, L.LightningDataModule):
        source.prepare_data()
        source.setup("fit")
        return source.train_dataloader() if split == "train" else source.val_dataloader()
    return source
