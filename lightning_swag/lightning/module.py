"""``SWAGModule``: Bayesian model averaging with a SWAG posterior, as a LightningModule.

Lightning glue over plain-torch pieces: the options become a likelihood
(:mod:`lightning_swag.likelihoods`), a weight stream (:mod:`lightning_swag.predictive.weights`), a model runner
(:mod:`lightning_swag.predictive.runner`) and a predictive (:mod:`lightning_swag.predictive`); this module
adds the run's seed, the hooks of ``trainer.predict`` / ``trainer.test``, test-metric logging,
held-out tuning and checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_swag.lightning.checkpoint_io import readable_checkpoint_errors
from lightning_swag.lightning.evaluation import TestStepLogging
from lightning_swag.lightning.execution import ExecutionChoices
from lightning_swag.lightning.held_out import HeldOutTuning
from lightning_swag.lightning.lockstep import Lockstep
from lightning_swag.lightning.module_checkpoints import PosteriorCheckpoints
from lightning_swag.likelihoods import (
    Likelihood,
    LinkApprox,
    Noise,
    Task,
    infer_task,
    likelihood_for,
)
from lightning_swag.posterior.parameters import unwrap_model
from lightning_swag.posterior.swag import SWAGPosterior
from lightning_swag.predictive import Predictive, RunState, build_predictive, stack_outputs
from lightning_swag.predictive.batches import default_batch_inputs, default_batch_targets
from lightning_swag.predictive.options import Covariance, Option, PredictiveKind, check_option
from lightning_swag.predictive.runner import ExecutionPlan, MemoryFormat
from lightning_swag.predictive.vectorize import Vectorize
from lightning_swag.predictive.weights import SamplingSpec, WeightStream, draw_run_seed

__all__ = ["SWAGModule", "infer_task"]

_STATE_DICT_GIVEN = (
    "{what} is a state dict (a Mapping, e.g. posterior.state_dict()), not a SWAGPosterior. Build the "
    "posterior from it first: SWAGModule(model, SWAGPosterior.from_state_dict(state)) (a file written "
    "with posterior.save(path): SWAGPosterior.load(path))."
)


class SWAGModule(TestStepLogging, HeldOutTuning, PosteriorCheckpoints, ExecutionChoices, L.LightningModule):
    """Bayesian model averaging with SWAG posterior samples, for ``trainer.predict`` / ``trainer.test``.

    Args:
        model: the trained network (any ``nn.Module``/LightningModule, also a ``torch.compile`` one,
            whose ``forward`` gives raw outputs; logits for classification). It is used as is and
            never modified.
        posterior: the :class:`SWAGPosterior` collected for ``model`` (e.g. ``swag.posterior``), or
            several independent ones (MultiSWAG: ``num_samples`` are drawn from each). ``None`` if
            it is to be restored from a checkpoint (``trainer.predict(..., ckpt_path=...)``).
        num_samples: weight samples per posterior.
        scale: covariance scale (``0.5`` = the paper's ``1/√2``). ``scale=0`` with
            ``num_samples=1`` is exactly the SWA model.
        task: what the outputs are: ``"regression"`` (``mean``, ``std``); ``"classification"``
            (logits, softmax over the class dimension: ``mean`` probabilities, ``std``, ``entropy``,
            ``mutual_information``); ``"binary"`` (one logit per row, sigmoid) or ``"multilabel"``
            (an independent sigmoid per label), with the same outputs per element. ``None`` infers it
            from the model (:func:`infer_task`).
        covariance: ``"low_rank"`` (full SWAG) or ``"diagonal"`` (SWAG-Diagonal).
        return_samples: also return the per-sample outputs ``samples`` ``[S, B, ...]``.
        seed: an int >= 0 that fixes the weight samples: the same seed gives the same samples
            whatever ``chunk_size``, the number of batches or of processes. Within one run the same
            weight samples are used for every batch. ``None`` draws a fresh seed per run (the same
            on every process under DDP).
        chunk_size: samples drawn and evaluated together (default: as many as fit in about
            256 MiB of weights). It bounds the memory of the weights and of the outputs (the
            summaries are accumulated chunk by chunk unless ``return_samples``); the results do not
            depend on it.
        vectorize: how the samples of a chunk run: ``"auto"`` (see :mod:`lightning_swag.predictive.vectorize`),
            or force ``"vmap"`` / ``"loop"`` (``True``/``False`` mean the same).
        bn_loader: training data (a loader, or a LightningDataModule whose ``train_dataloader``
            is used) to recompute BatchNorm running statistics for every weight sample before
            predicting (``torch.optim.swa_utils.update_bn`` semantics). Without it the model's own,
            stale statistics are used (a warning says so). The model's buffers are never modified.
        bn_num_batches: use only this many batches (an int) or this fraction (a float in (0, 1])
            of ``bn_loader`` for the refresh.
        output_transform: maps the model's raw output to the tensor to average (e.g.
            ``lambda out: out[0]``); outputs with a ``logits`` entry (Hugging Face) need none. With
            ``noise="heteroscedastic"`` it may return a ``(mean, variance)`` pair of tensors.
        noise: the noise model of a regression: ``None`` (the spread of the sampled outputs only), a
            float ``σ > 0`` (homoscedastic; ``fit_noise`` sets it) or ``"heteroscedastic"`` (the
            last output dimension holds mean and log-variance). See
            :mod:`lightning_swag.likelihoods.gaussian`.
        memory_format: the layout of 4-D tensors of conv nets: ``"auto"`` (channels-last on a CPU
            when a trial forward shows the model accepts it), ``"channels_last"`` or ``"preserve"``.
        class_dim: the class dimension of classification outputs with more than two dimensions:
            ``1`` for ``[B, C, H, W]`` (segmentation), ``-1`` for ``[B, T, C]`` (tokens). Without it
            such an output is an error.
        ignore_index: targets equal to this are skipped by test metrics and ``tune_scale`` (padding).
        predictive: ``"sampled"`` (Monte Carlo over weight samples) or ``"linearized"`` (outputs
            linear in the weights around the SWA mean: a Gaussian over the outputs, no weight
            samples; see :mod:`lightning_swag.predictive.linearized`).
        link_approx: how the linearised predictive averages a softmax or sigmoid: ``"probit"`` or
            ``"mc"`` (the linearised outputs under the run's ``num_samples`` weight samples, the
            same samples as the sampled predictive's).
        split_forward: for a posterior over one submodule whose output is the model's output (a
            head, the last block), run the rest of the network once per batch (checked at the first
            batch; see :mod:`lightning_swag.predictive.subset`). ``False`` always runs the whole model.

    Forward arguments: whatever :meth:`batch_inputs` returns is passed to the model as
    ``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple, else ``model(inputs)``
    (:mod:`lightning_swag.predictive.batches`). The model runs in eval mode (dropout off, BatchNorm on running
    statistics); module modes are restored afterwards. Changing an option (``bma.scale = 1.0``)
    takes effect at the next call.

    Sharded posteriors (``SWAGCallback(shard=True)`` under DDP, or FSDP2 under
    ``ModelParallelStrategy``) predict under the strategy they were collected with, with the same
    seed on every process (see :mod:`lightning_swag.posterior.sharding`); ``bn_loader`` is not supported with
    FSDP2 yet.
    """

    num_samples = Option("num_samples")
    scale = Option("scale")
    task = Option("task")
    covariance = Option("covariance")
    return_samples = Option("return_samples", resets=False)
    seed = Option("seed")
    chunk_size = Option("chunk_size")
    vectorize = Option("vectorize")
    bn_loader = Option("bn_loader")
    bn_num_batches = Option("bn_num_batches")
    output_transform = Option("output_transform")
    noise = Option("noise")
    memory_format = Option("memory_format")
    class_dim = Option("class_dim")
    ignore_index = Option("ignore_index")
    predictive = Option("predictive")
    link_approx = Option("link_approx")
    split_forward = Option("split_forward")

    def __init__(
        self,
        model: nn.Module,
        posterior: SWAGPosterior | Sequence[SWAGPosterior] | None = None,
        num_samples: int = 30,
        scale: float = 0.5,
        task: Task | None = None,
        covariance: Covariance = "low_rank",
        return_samples: bool = False,
        seed: int | None = None,
        chunk_size: int | None = None,
        vectorize: Vectorize | bool = "auto",
        bn_loader: Iterable[Any] | L.LightningDataModule | None = None,
        bn_num_batches: int | float | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        noise: Noise = None,
        memory_format: MemoryFormat = "auto",
        class_dim: int | None = None,
        ignore_index: int = -100,
        predictive: PredictiveKind = "sampled",
        link_approx: LinkApprox = "probit",
        split_forward: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = unwrap_model(model)
        self._built: Predictive | None = None
        self._run_seed: int | None = None
        self._lockstep = Lockstep()
        self._test_metrics = nn.ModuleDict()
        self._posteriors: list[SWAGPosterior] = []
        options = dict(locals())
        for name in type(self).option_names():
            value = options[name] if name != "task" or task is not None else infer_task(self.model)
            object.__setattr__(self, f"_option_{name}", check_option(name, value))
        self._likelihood()  # the task's options are checked together now
        self._warn_if_batchnorm_is_stale(posterior)
        if posterior is not None:
            self.posteriors = [posterior] if isinstance(posterior, SWAGPosterior) else posterior

    @classmethod
    def option_names(cls) -> list[str]:
        """The options that can be changed after construction (every argument but model and posterior)."""
        names = (
            name
            for klass in reversed(cls.__mro__)
            for name, value in vars(klass).items()
            if isinstance(value, Option)
        )
        return list(dict.fromkeys(names))  # subclasses (batch layout overrides) inherit the options

    def options_changed(self, resets: bool) -> None:
        """Called when an option is set: the next call rebuilds the predictive (and draws new samples)."""
        if resets:
            self._built = None

    # ------------------------------------------------------------------ posteriors
    @property
    def posteriors(self) -> list[SWAGPosterior]:
        """The posterior(s) sampled from (several for MultiSWAG)."""
        return self._posteriors

    @posteriors.setter
    def posteriors(self, posteriors: Sequence[SWAGPosterior]) -> None:
        if isinstance(posteriors, Mapping):  # iterating it would give its keys
            raise TypeError(_STATE_DICT_GIVEN.format(what="posterior"))
        posteriors = list(posteriors)
        if not posteriors:
            raise ValueError("Give at least one SWAGPosterior.")
        for i, post in enumerate(posteriors):
            if isinstance(post, Mapping):
                raise TypeError(_STATE_DICT_GIVEN.format(what=f"posterior {i}"))
            if not isinstance(post, SWAGPosterior):
                raise TypeError(f"posterior {i} is a {type(post).__name__}, not a SWAGPosterior.")
            if post.num_snapshots == 0:
                raise ValueError(
                    f"posterior {i} holds no snapshots, so there is nothing to sample. Train with "
                    "SWAGCallback until at least one snapshot is collected (check start_epoch vs max_epochs)."
                )
            post.check_compatible(self.model)
            if post.is_sharded and not post.layout.fits(self.model):
                raise ValueError(
                    f"posterior {i} holds a part of the weights ({post.layout.describe()}) that does not fit "
                    "this model's parameters: predict with the model it was collected from, under the same "
                    "strategy, or gather() the posterior to one process first."
                )
        if any(post.num_snapshots == 1 for post in posteriors):
            warnings.warn(
                "SWAGModule: a posterior holds one snapshot only, so it has no spread: every weight sample is "
                "its SWA mean and the std of the BMA is exactly 0. Collect more snapshots (SWAGCallback's "
                "start_epoch, every_n_epochs / every_n_steps).",
                stacklevel=3,
            )
        self._posteriors = posteriors
        self._built = None

    @property
    def posterior(self) -> SWAGPosterior:
        """The first (usually only) posterior."""
        self._require_posteriors()
        return self._posteriors[0]

    @property
    def total_samples(self) -> int:
        """Weight samples per prediction: ``num_samples`` times the number of posteriors (``0`` for the
        linearised predictive in closed form, ``link_approx="probit"``, which draws none)."""
        if not self._predictive().uses_weight_samples:
            return 0
        return self.num_samples * len(self._posteriors)

    @property
    def execution_plan(self) -> ExecutionPlan | None:
        """How the forward passes run (vmap or loop, channels-last, the split), once decided at the
        first batch; ``None`` before."""
        return self._built.plan if self._built is not None else None

    # ------------------------------------------------------------------ batch layout
    def batch_inputs(self, batch: Any) -> Any:
        """The model input of a batch (default: :func:`~lightning_swag.predictive.batches.default_batch_inputs`).
        Override for other batch layouts."""
        return default_batch_inputs(batch)

    def batch_targets(self, batch: Any) -> Any:
        """The targets of a labelled batch (default: ``batch[1]`` or ``batch["labels"]``). Override for
        other layouts."""
        return default_batch_targets(batch)

    # ------------------------------------------------------------------ prediction
    @override
    def forward(self, x: Any) -> dict[str, Tensor]:
        """BMA summary of the outputs for input ``x`` (see :meth:`predict_step`)."""
        return self._summarize(x, keep_samples=self.return_samples)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """One dict per batch: ``mean``, ``std`` (+ ``entropy``, ``mutual_information`` for
        classification, + ``epistemic_std``, ``aleatoric_std`` for a regression with a noise model,
        + ``samples`` when ``return_samples``)."""
        return self(self.batch_inputs(batch))

    @torch.no_grad()
    def sample_outputs(self, x: Any) -> Any:
        """Model outputs for ``x`` under every weight sample, stacked: ``[S, B, ...]`` (a pair of such
        tensors when a heteroscedastic ``output_transform`` returns ``(mean, variance)``); the
        linearised outputs under the same samples for ``predictive="linearized"``."""
        predictive = self._predictive()
        with _eval_mode(self.model):
            self._lockstep.record(x)
            return stack_outputs(list(predictive.outputs(x, self._run_state())))

    @torch.no_grad()
    def _components(self, x: Any) -> tuple[Tensor, Tensor | None]:
        """The predictive's components at ``x`` (see :meth:`Predictive.components`)."""
        predictive = self._predictive()
        with _eval_mode(self.model):
            self._lockstep.record(x)
            return predictive.components(x, self._run_state())

    def sample_components(self, x: Any) -> tuple[Tensor, Tensor]:
        """Per-weight-sample predictive means and noise variances ``[S, B, ...]`` of a regression with
        a noise model (the components of the predictive mixture)."""
        components = getattr(self._likelihood(), "components", None)
        if components is None:
            raise ValueError(
                "sample_components needs a noise model: SWAGModule(..., noise=σ or 'heteroscedastic'), "
                "or fit_noise(held_out_loader) first."
            )
        return components(self.sample_outputs(x))

    def iter_weight_samples(self) -> Iterator[dict[str, Tensor]]:
        """Weight samples as ``{name: [chunk, *shape]}`` dicts on the model's device, each tensor in its
        parameter's dtype. Sample ``i`` of posterior ``j`` is sample ``i`` of the seed
        ``derive_seed(run seed, j)``; for FSDP2 shards, this process's shards of the samples."""
        self._require_posteriors()
        stream = WeightStream(self._prepared_posteriors(), self.model)
        yield from stream.chunks(self._spec(), self._current_seed())

    def reset_samples(self) -> None:
        """Draw a new set of weight samples at the next batch (a fixed one when ``seed`` is set)."""
        self._run_seed = None
        if self._built is not None:
            self._built.reset()

    def _summarize(self, x: Any, keep_samples: bool) -> dict[str, Tensor]:
        predictive = self._predictive()
        self._lockstep.record(x)
        with torch.no_grad(), _eval_mode(self.model):
            out = predictive.predict(x, self._run_state(), keep_samples)
            self._check_batchnorm_order(x)
        return out

    def _run_state(self) -> RunState:
        return RunState(self._spec(), self._current_seed())

    def _spec(self) -> SamplingSpec:
        return SamplingSpec(self.num_samples, self.scale, self.covariance == "diagonal", self.chunk_size)

    def _current_seed(self) -> int:
        if self._run_seed is None:
            shared = any(post.is_sharded for post in self._posteriors)
            self._run_seed = self.seed if self.seed is not None else draw_run_seed(shared)
        return self._run_seed

    def _likelihood(self) -> Likelihood:
        if self._built is not None:
            return self._built.likelihood
        return likelihood_for(self.task, self.noise, self.class_dim, self.ignore_index)

    def _prepared_posteriors(self) -> list[SWAGPosterior]:
        """The posteriors as this model's strategy runs them (an FSDP2 model gets its part of each)."""
        return [post.sharded_like(self.model) for post in self._posteriors]

    def _predictive(self) -> Predictive:
        self._require_posteriors()
        if self._built is None:
            posteriors = self._prepared_posteriors()
            self._posteriors = posteriors
            self._built = build_predictive(
                self.predictive,
                self._likelihood(),
                posteriors,
                self.model,
                self._runner_options(),
                self._batchnorm_refresh(posteriors),
                self._progress,
                self.link_approx,
            )
        return self._built

    # ------------------------------------------------------------------ runs
    @override
    def setup(self, stage: str) -> None:
        readable_checkpoint_errors(self.trainer.strategy)

    @override
    def configure_model(self) -> None:
        """Nothing to do: the wrapped model arrives as trained (``ModelParallelStrategy`` requires this
        hook; an FSDP2 model keeps its shards)."""

    @override
    def on_predict_start(self) -> None:
        self._start_run()

    @override
    def on_test_start(self) -> None:
        self._start_run()

    @override
    def on_predict_epoch_end(self) -> None:
        self._finish_run()

    @override
    def on_test_epoch_end(self) -> None:
        self._finish_run()

    def _require_posteriors(self) -> None:
        if not self._posteriors:
            raise RuntimeError(
                "SWAGModule has no posterior: pass posterior=swag.posterior, or restore it with "
                "trainer.predict(module, ckpt_path=...) from a checkpoint written with SWAGCallback."
            )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; every module's mode restored after it."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
