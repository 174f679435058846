"""``trainer.test`` with a ``SWAGModule``: the BMA of labelled batches and its logged metrics.

:class:`TestStepLogging` is the part of ``SWAGModule`` that keeps one set of the likelihood's test
metrics per test dataloader and logs them with Lightning's ``self.log``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from typing_extensions import override

from lightning_swag.likelihoods import Likelihood, TestMetrics

__all__ = ["PER_SAMPLE_KEYS", "TestStepLogging"]

PER_SAMPLE_KEYS = ("samples", "sample_variances")
"""The entries of a BMA summary that hold one value per weight sample."""


class TestStepLogging:
    """``test_step`` of :class:`~lightning_swag.SWAGModule`."""

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """BMA on a labelled batch; metrics are logged per test dataloader at the end of the epoch.

        Classification, binary and multi-label: ``test_accuracy``, ``test_nll``, ``test_brier``,
        ``test_ece`` (15 bins), ``test_entropy`` and ``test_mutual_information`` (dense outputs: per
        element, skipping ``ignore_index``). Regression: ``test_rmse`` and ``test_mean_std``; with a
        noise model the mixture's ``test_nll``, ``test_rmse``, ``test_crps``,
        ``test_calibration_error``, ``test_mean_std`` and ``test_coverage_50/90/95``. With several
        test dataloaders the names get Lightning's ``/dataloader_idx_<k>`` suffix, and each loader's
        values are those of testing it alone.
        """
        targets = self.batch_targets(batch)
        likelihood = self._likelihood()
        out = self._summarize(
            self.batch_inputs(batch), keep_samples=self.return_samples or likelihood.needs_samples
        )
        metrics = self._test_metrics_for(dataloader_idx, out, likelihood)
        likelihood.update_test_metrics(metrics, out, targets)
        for key, metric in metrics.logged.items():
            self.log(
                f"test_{key}",
                metric,
                on_step=False,
                on_epoch=True,
                metric_attribute=f"_test_metrics.{dataloader_idx}.logged.{key}",
            )
        return out if self.return_samples else {k: v for k, v in out.items() if k not in PER_SAMPLE_KEYS}

    @override
    def on_test_epoch_start(self) -> None:
        self._test_metrics = nn.ModuleDict()

    def _test_metrics_for(
        self, dataloader_idx: int, out: dict[str, Tensor], likelihood: Likelihood
    ) -> TestMetrics:
        key = str(dataloader_idx)
        if key not in self._test_metrics:
            self._test_metrics[key] = likelihood.test_metrics(out).to(out["mean"].device)
        return self._test_metrics[key]  # type: ignore[return-value]
