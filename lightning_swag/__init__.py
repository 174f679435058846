"""lightning-swag: SWAG Bayesian uncertainty for any PyTorch Lightning model.

``SWAGCallback`` collects a Gaussian posterior over the weights during ``trainer.fit``;
``SWAGModule`` runs Bayesian model averaging over posterior samples in ``trainer.predict`` and
``trainer.test``; ``BMA`` is the same averaging in plain torch, for use without a Trainer;
``export_adapter`` writes a point of a posterior over peft adapters as a peft adapter directory. The
public API is what this module exports (``__all__``), plus the modules ``metrics`` (uncertainty
metrics) and ``likelihoods.summaries`` (BMA summaries of per-sample outputs). The experiment kit
(reference data, models, figures) is ``lightning_swag.experiments``; the core never imports it.
"""

from lightning_swag import metrics
from lightning_swag.adapters import export_adapter
from lightning_swag.lightning.callback import SWAGCallback
from lightning_swag.lightning.module import SWAGModule
from lightning_swag.lightning.writer import SWAGPredictionWriter, load_predictions, merge_predictions
from lightning_swag.likelihoods import infer_task
from lightning_swag.posterior import SWAGPosterior
from lightning_swag.predictive.batchnorm import refresh_batchnorm, refresh_batchnorm_batched
from lightning_swag.predictive.bma import BMA

__all__ = [
    "BMA",
    "SWAGCallback",
    "SWAGModule",
    "SWAGPosterior",
    "SWAGPredictionWriter",
    "export_adapter",
    "infer_task",
    "load_predictions",
    "merge_predictions",
    "metrics",
    "refresh_batchnorm",
    "refresh_batchnorm_batched",
]
# the one version source: pyproject.toml reads it ([tool.setuptools.dynamic]), so keep it a plain literal
__version__ = "0.1.0.dev0"
