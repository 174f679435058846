"""The posterior over the weights: the ``Posterior`` protocol, SWAG's Gaussian and what it is made of.

:class:`~lightning_swag.posterior.protocol.Posterior` is what the predictives need of any posterior (a
user's deep ensemble works as well). :class:`~lightning_swag.posterior.swag.SWAGPosterior` keeps the
SWA mean, the diagonal variance and the deviation rows of the tracked parameters
(:mod:`~lightning_swag.posterior.statistics`, drawing from the noise table of
:mod:`~lightning_swag.posterior.noise`); :meth:`SWAGPosterior.diagonal` is its SWAG-Diagonal view
(:mod:`~lightning_swag.posterior.diagonal`). Which parameters are tracked and their canonical names
are :mod:`~lightning_swag.posterior.parameters`; how a posterior is split across processes is
:mod:`~lightning_swag.posterior.sharding`; stored form is :mod:`~lightning_swag.posterior.storage`
and the file format :mod:`~lightning_swag.posterior.format`. Plain torch: nothing here imports Lightning.
"""

from lightning_swag.posterior.diagonal import SWAGDiagonal
from lightning_swag.posterior.protocol import GaussianPosterior, Posterior
from lightning_swag.posterior.swag import SWAGPosterior

__all__ = ["GaussianPosterior", "Posterior", "SWAGDiagonal", "SWAGPosterior"]
