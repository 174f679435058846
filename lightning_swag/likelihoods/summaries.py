"""Bayesian-model-averaging summaries of per-sample outputs ``[S, B, ...]`` (sample axis first).

Pure functions of the stacked outputs of ``S`` weight samples, usable on their own (e.g. on
``return_samples=True`` output). Each summary has one implementation, over chunks of samples
(:func:`moments_summary`, :func:`probability_summary`, :func:`gaussian_mixture_summary`): the
likelihood classes call it chunk by chunk, the ``summarize_*`` functions with one chunk.

With a noise model, every weight sample ``s`` predicts a Gaussian ``N(mean_s, variance_s)`` and the
Bayesian model average is the equal-weight Gaussian mixture over the samples;
:func:`summarize_gaussian_mixture` gives its mean and standard deviation and splits the variance
into an epistemic part (spread of the sample means) and an aleatoric part (mean noise variance).

The summaries reduce a chunk a few samples at a time (:func:`sample_blocks`): every step then works
on tensors that stay in the CPU's cache instead of allocating fresh chunk-sized temporaries, which
for large outputs (thousands of classes) cost more than the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

__all__ = [
    "BLOCK_ELEMENTS",
    "RunningMean",
    "RunningMoments",
    "bernoulli_entropy",
    "categorical_entropy",
    "gaussian_mixture_summary",
    "moments_summary",
    "probability_summary",
    "sample_blocks",
    "sample_var_mean",
    "sigmoid_with_entropy",
    "softmax_with_entropy",
    "heteroscedastic_mean_variance",
    "mixture_summary",
    "summarize_classification",
    "summarize_gaussian_mixture",
    "summarize_heteroscedastic",
    "summarize_regression",
    "summary_dtype",
]

BLOCK_ELEMENTS = 2**20
"""The summaries reduce at most this many output elements at once (whole samples, at least one)."""


def sample_blocks(chunks: Iterable[Tensor]) -> Iterator[Tensor]:
    """The chunks ``[n, B, ...]`` cut along the sample axis into blocks of at most
    :data:`BLOCK_ELEMENTS` elements (at least one sample each), in order."""
    for chunk in chunks:
        per_sample = max(1, chunk[0].numel()) if chunk.shape[0] else 1
        yield from chunk.split(max(1, BLOCK_ELEMENTS // per_sample))


def summary_dtype(outputs: Tensor) -> torch.dtype:
    """The dtype summaries are computed in: float64 for float64 outputs, float32 for any other."""
    return torch.float64 if outputs.dtype == torch.float64 else torch.float32


def categorical_entropy(probs: Tensor) -> Tensor:
    """Entropy ``−Σ p log p`` over the last dimension (nats)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def sample_var_mean(values: Tensor) -> tuple[Tensor, Tensor]:
    """Population variance and mean over the sample axis (dim 0), in two passes.

    Same result as ``torch.var_mean(values, dim=0, correction=0)`` to rounding, but several times
    faster on a CPU for ``[S, B, ...]`` tensors (the fused kernel reduces over the outer dimension
    slowly); the two-pass form subtracts the mean first, so nothing cancels.
    """
    mean = values.mean(dim=0)
    return (values - mean).square_().mean(dim=0), mean


def softmax_with_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dimension and the entropy of each distribution, from logits.

    ``H = log Σ exp(z − max z) − Σ p (z − max z)`` needs no logarithm per element. Written out
    because ``torch.softmax`` over a short last dimension (the classes) is several times slower on a
    CPU than these elementwise steps.
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    probs = shifted.exp()
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    entropy = total.squeeze(-1).log_() - (probs * shifted).sum(dim=-1)
    return probs, entropy


def bernoulli_entropy(probs: Tensor) -> Tensor:
    """Entropy ``−p log p − (1 − p) log(1 − p)`` of each Bernoulli probability (nats), elementwise."""
    return -(torch.special.xlogy(probs, probs) + torch.special.xlogy(1 - probs, 1 - probs))


def sigmoid_with_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Sigmoid probabilities and their Bernoulli entropies from logits, elementwise.

    ``H = softplus(z) − z·σ(z)`` is exact for any logit (no ``log 0`` for saturated ones)."""
    probs = torch.sigmoid(logits)
    return probs, torch.nn.functional.softplus(logits) - logits * probs


class RunningMean:
    """The mean over the sample axis (dim 0), merged chunk by chunk (one chunk gives ``mean(dim=0)``)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None

    def update(self, values: Tensor) -> None:
        """Add the ``values.shape[0]`` samples of ``values``."""
        mean, n = values.mean(dim=0), values.shape[0]
        if self.mean is None:
            self.count, self.mean = n, mean
            return
        total = self.count + n
        self.mean = self.mean + (mean - self.mean) * (n / total)
        self.count = total


class RunningMoments:
    """Mean and population variance over the sample axis (dim 0), merged chunk by chunk.

    Each chunk ``[n, ...]`` is reduced with :func:`sample_var_mean` and merged with the running
    ``(count, mean, variance)`` by the pairwise formula of Chan et al., so memory does not grow with
    the number of samples, and one chunk gives exactly :func:`sample_var_mean`'s result.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.variance: Tensor | None = None

    def update(self, values: Tensor) -> None:
        """Add the ``values.shape[0]`` samples of ``values``."""
        var, mean = sample_var_mean(values)
        n = values.shape[0]
        if self.mean is None or self.variance is None:
            self.count, self.mean, self.variance = n, mean, var
            return
        total = self.count + n
        delta = mean - self.mean
        self.variance = (
            self.variance * self.count + var * n + delta.square() * (self.count * n / total)
        ) / total
        self.mean = self.mean + delta * (n / total)
        self.count = total


def moments_summary(chunks: Iterable[Tensor]) -> dict[str, Tensor]:
    """``mean`` and ``std`` (``correction=0``) over the sample axis of all chunks ``[n, B, ...]``:
    the one implementation behind :func:`summarize_regression` and the ``Regression`` likelihood."""
    moments = RunningMoments()
    for outputs in sample_blocks(chunks):
        moments.update(outputs)
    assert moments.mean is not None and moments.variance is not None, "no chunks to summarise"
    return {"mean": moments.mean, "std": moments.variance.sqrt_()}


def probability_summary(
    chunks: Iterable[Tensor],
    link: Callable[[Tensor], tuple[Tensor, Tensor]],
    entropy: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """BMA summary of logit chunks ``[n, B, ...]`` under ``link`` (logits to probabilities and each
    sample's entropy): mean and std of the probabilities, the entropy of the mean and the mutual
    information (entropy of the mean − mean entropy). The one implementation behind
    :func:`summarize_classification` and the categorical and Bernoulli likelihoods."""
    moments, entropies = RunningMoments(), RunningMean()
    for logits in sample_blocks(chunks):
        probs, sample_entropy = link(logits.to(summary_dtype(logits)))
        moments.update(probs)
        entropies.update(sample_entropy)
    assert moments.mean is not None and moments.variance is not None and entropies.mean is not None
    mean_entropy = entropy(moments.mean)
    if moments.count > 1:
        mutual = (mean_entropy - entropies.mean).clamp_(min=0)
    else:  # one sample cannot disagree with itself: exactly 0, not the rounding of two entropy formulas
        mutual = torch.zeros_like(mean_entropy)
    return {
        "mean": moments.mean,
        "std": moments.variance.sqrt_(),
        "entropy": mean_entropy,
        "mutual_information": mutual,
    }


def mixture_summary(mean: Tensor, epistemic_var: Tensor, aleatoric_var: Tensor) -> dict[str, Tensor]:
    """The summary of a Gaussian mixture from its mean and the two parts of its variance."""
    return {
        "mean": mean,
        "std": (epistemic_var + aleatoric_var).sqrt(),
        "epistemic_std": epistemic_var.sqrt(),
        "aleatoric_std": aleatoric_var.sqrt(),
    }


def gaussian_mixture_summary(components: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """:func:`mixture_summary` of chunks of components ``(means, variances)`` (variances broadcastable
    to means): the one implementation behind :func:`summarize_gaussian_mixture` and the noise models."""
    means, noise = RunningMoments(), RunningMean()
    for mean, variance in components:
        means.update(mean)
        noise.update(variance.expand_as(mean))
    assert means.mean is not None and means.variance is not None and noise.mean is not None
    return mixture_summary(means.mean, means.variance, noise.mean)


def summarize_regression(outputs: Tensor) -> dict[str, Tensor]:
    """Mean and standard deviation over the sample axis (dim 0) of ``[S, B, ...]`` outputs.

    The std is the spread of the Monte-Carlo mixture (``correction=0``), so ``S = 1`` gives 0.
    """
    return moments_summary([outputs])


def summarize_classification(logits: Tensor) -> dict[str, Tensor]:
    """BMA summary of ``[S, B, C]`` logits: mean and std of the softmax probabilities,
    predictive entropy of the mean, and mutual information (entropy of the mean − mean entropy)."""
    return probability_summary([logits], softmax_with_entropy, categorical_entropy)


def heteroscedastic_mean_variance(outputs: Tensor) -> tuple[Tensor, Tensor]:
    """Split outputs whose last dimension holds ``(mean, log-variance)`` into ``(mean, variance)``.

    The layout of ``SWAGModule(noise="heteroscedastic")``: ``outputs[..., 0]`` is the mean and
    ``outputs[..., 1]`` the natural log of the noise variance (a network predicting the log keeps
    the variance positive without a constraint). The last dimension is dropped, so ``[S, B, 2]``
    gives two ``[S, B]`` tensors.
    """
    if outputs.ndim == 0 or outputs.shape[-1] != 2:
        raise ValueError(
            "A heteroscedastic output must have a last dimension of size 2 holding (mean, log-variance); "
            f"got shape {tuple(outputs.shape)}. For another layout, convert the output to a "
            "(mean, variance) pair first (SWAGModule's output_transform)."
        )
    return outputs[..., 0], outputs[..., 1].exp()


def summarize_gaussian_mixture(means: Tensor, variances: Tensor | float) -> dict[str, Tensor]:
    """Summary of the equal-weight mixture of ``N(means[s], variances[s])`` over the sample axis (dim 0).

    Args:
        means: per-sample predictive means ``[S, B, ...]``.
        variances: per-sample noise variances, broadcastable to ``means`` (e.g. ``[S, B, ...]`` for a
            heteroscedastic model, or a float ``sigma**2`` for homoscedastic noise). Must be >= 0.

    Returns:
        ``mean`` (mixture mean), ``std`` (mixture std, ``sqrt(epistemic_std**2 + aleatoric_std**2)``),
        ``epistemic_std`` (std of the sample means, ``correction=0``) and ``aleatoric_std`` (root of
        the mean noise variance), each of shape ``[B, ...]``. This is the law of total variance.
    """
    if means.ndim == 0:
        raise ValueError("means must have a leading sample axis: shape [S, B, ...].")
    variances = torch.as_tensor(variances, dtype=means.dtype, device=means.device).expand_as(means)
    if bool((variances < 0).any()):
        raise ValueError(f"variances must be >= 0; the smallest is {float(variances.min()):.3g}.")
    return gaussian_mixture_summary([(means, variances)])


def summarize_heteroscedastic(outputs: Tensor) -> dict[str, Tensor]:
    """:func:`summarize_gaussian_mixture` of ``[S, B, ..., 2]`` outputs holding ``(mean, log-variance)``."""
    return summarize_gaussian_mixture(*heteroscedastic_mean_variance(outputs))
