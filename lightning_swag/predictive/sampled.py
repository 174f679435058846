"""The Monte Carlo predictive: the model averaged over weight samples of the posterior(s).

Each chunk of samples from the :class:`~lightning_swag.predictive.weights.WeightStream` runs through the
:class:`~lightning_swag.predictive.runner.ModelRunner`; the likelihood summarises the outputs chunk by chunk,
so without ``return_samples`` memory is bounded by one chunk's outputs whatever ``num_samples``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_swag.likelihoods import Likelihood, Outputs
from lightning_swag.posterior.protocol import layout_of
from lightning_swag.predictive.base import Predictive, PredictiveContext, RunState
from lightning_swag.predictive.batchnorm import BatchNormRefresh
from lightning_swag.predictive.runner import ExecutionPlan, ModelRunner
from lightning_swag.predictive.weights import SamplingSpec, WeightStream

__all__ = ["SampledPredictive", "stack_outputs"]


class SampledPredictive(Predictive):
    """Bayesian model averaging over weight samples (see the module docstring).

    Args:
        likelihood: what the outputs mean.
        stream: the weight samples.
        runner: runs the model under them.
        batchnorm: recomputes BatchNorm statistics per chunk of samples (``None``: the model's own).
        progress: wraps the drawing of a cached run's samples in a progress bar.
    """

    name = "sampled"

    def __init__(
        self,
        likelihood: Likelihood,
        stream: WeightStream,
        runner: ModelRunner,
        batchnorm: BatchNormRefresh | None = None,
        progress: Callable[[Iterator[Any], int], Iterable[Any]] | None = None,
    ) -> None:
        super().__init__(likelihood)
        self.stream = stream
        self.runner = runner
        self.batchnorm = batchnorm
        self.progress = progress
        self._checked = False

    @classmethod
    def from_context(cls, context: PredictiveContext) -> SampledPredictive:
        stream = context.stream()
        return cls(context.likelihood, stream, context.runner(stream), context.batchnorm, context.progress)

    @property
    def plan(self) -> ExecutionPlan:
        return self.runner.plan

    def collective_forwards(self, spec: SamplingSpec) -> bool:
        """Whether every batch runs collectives (so processes must run the same number of batches):
        FSDP2 forwards, or DDP slices whose samples do not fit the cache and are joined per batch.
        Samples that fit are joined here, once, by every process at the start of the run."""
        layouts = [layout_of(post) for post in self.stream.posteriors]
        if any(layout.forward_in_place for layout in layouts):
            return True
        if not any(layout.joins_samples for layout in layouts):
            return False
        return not self.stream.fits_cache(spec)

    def start_run(self, run: RunState) -> None:
        """Join sharded samples that fit the cache now, on every process (a collective)."""
        if any(layout_of(post).joins_samples for post in self.stream.posteriors) and self.stream.fits_cache(
            run.spec
        ):
            self.stream.chunks(run.spec, run.seed)

    def reset(self) -> None:
        self.stream.clear()
        if self.batchnorm is not None:
            self.batchnorm.clear()

    def outputs(self, inputs: Any, run: RunState) -> Iterator[Outputs]:
        """The outputs of every chunk of samples on ``inputs``, in sample order."""
        self.runner.decide(inputs, self.stream.mean_weights)  # called once, at the first batch
        prepared = self.runner.prepare_inputs(inputs)
        chunks = self.stream.chunks(
            run.spec, run.seed, self.runner.prepare_chunk, self.progress, key=self.runner.prepare_key
        )
        for index, chunk in enumerate(chunks):
            buffers = self._buffers(chunk, (run, self.runner.prepare_key, index))
            outputs = self.runner.run(chunk, prepared, buffers)
            if not self._checked:
                self.likelihood.check_outputs(outputs)
                self._checked = True
            yield outputs

    def predict(self, inputs: Any, run: RunState, keep_samples: bool) -> dict[str, Tensor]:
        outputs = self.outputs(inputs, run)
        if not keep_samples:
            return self.likelihood.summarize(outputs)
        stacked = stack_outputs(list(outputs))
        return {**self.likelihood.summarize([stacked]), **self.likelihood.sample_entries(stacked)}

    def _buffers(self, chunk: dict[str, Tensor], key: Any) -> dict[str, Tensor]:
        if self.batchnorm is None:
            return {}
        model = self.runner.model
        return self.batchnorm.buffers(
            model, chunk, key, self.runner.plan.vectorize or "auto", self.runner.split_candidate
        )


def stack_outputs(parts: list[Outputs]) -> Outputs:
    """The outputs of several chunks as one ``[S, B, ...]`` (or a pair of them)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(group, dim=0) for group in zip(*parts, strict=True))  # type: ignore[return-value]
    return torch.cat(parts, dim=0)  # type: ignore[arg-type]
