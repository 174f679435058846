"""lightning-swag: SWAG Bayesian uncertainty for any PyTorch Lightning model.

``SWAGCallback`` collects a Gaussian posterior over the weights during ``trainer.fit``;
``SWAGModule`` runs Bayesian model averaging over posterior samples in ``trainer.predict``.
"""

from lightning_swag.callback import SWAGCallback
from lightning_swag.module import SWAGModule
from lightning_swag.posterior import SWAGPosterior
from lightning_swag.writer import SWAGPredictionWriter

__all__ = ["SWAGCallback", "SWAGModule", "SWAGPosterior", "SWAGPredictionWriter"]
__version__ = "0.1.0.dev0"
