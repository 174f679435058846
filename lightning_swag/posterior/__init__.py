"""The posterior over the weights: SWAG's Gaussian and what it is made of.

:class:`~lightning_swag.posterior.swag.SWAGPosterior` keeps the SWA mean, the diagonal variance and
the deviation rows of the tracked parameters (:mod:`~lightning_swag.posterior.statistics`, drawing
from the noise table of :mod:`~lightning_swag.posterior.noise`); which parameters are tracked and
their canonical names are :mod:`~lightning_swag.posterior.parameters`; how a posterior is split
across processes is :mod:`~lightning_swag.posterior.sharding`; the file format is
:mod:`~lightning_swag.posterior.format`. Plain torch: nothing here imports Lightning.
"""

from lightning_swag.posterior.swag import SWAGPosterior

__all__ = ["SWAGPosterior"]
