"""``BMA``: Bayesian model averaging with a SWAG posterior, in plain torch.

``BMA(model, posterior, num_samples=..., task=..., seed=...)(inputs)`` returns the summary of the
predictive at a batch's inputs (``mean``, ``std``, ...), the same dict as
:class:`~lightning_swag.SWAGModule` for the same options and seed. It owns the options (each checked
when set, see :mod:`lightning_swag.predictive.options`), the posterior(s), the run seed, the
likelihood (:mod:`lightning_swag.likelihoods`) and the predictive (:mod:`lightning_swag.predictive`),
and tunes the scale and the noise on held-out batches. Inputs are passed to the model as
``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple, else ``model(inputs)``; the model
runs in eval mode (module modes are restored afterwards). Changing an option (``bma.scale = 1.0``)
takes effect at the next call. ``SWAGModule`` holds one and adds the
Lightning hooks; without a Trainer, use ``BMA`` directly::

    bma = BMA(model, swag.posterior, num_samples=30, task="classification", seed=0)
    probs = bma(x)["mean"]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

import lightning_swag.predictive.tuning as tuning
from lightning_swag.likelihoods import Likelihood, LinkApprox, Noise, Task, infer_task, likelihood_for
from lightning_swag.posterior.parameters import unwrap_model
from lightning_swag.posterior.protocol import (
    Posterior,
    check_fits,
    check_posterior,
    diagonal_of,
    layout_of,
    sharded_for,
)
from lightning_swag.predictive import Predictive, PredictiveContext, RunState, build_predictive, stack_outputs
from lightning_swag.predictive.batches import default_batch_inputs
from lightning_swag.predictive.batchnorm import BatchNormPolicy
from lightning_swag.predictive.options import Covariance, Option, PredictiveChoice, check_option
from lightning_swag.predictive.runner import ExecutionPlan, MemoryFormat
from lightning_swag.predictive.vectorize import Vectorize
from lightning_swag.predictive.weights import SamplingSpec, WeightStream, draw_run_seed

__all__ = ["BMA", "Progress", "resolve_loader"]


Progress = Callable[..., Iterable[Any]]
"""``progress(iterable, total, description)``: the iterable wrapped in a progress bar (or as it is)."""

_STATE_DICT_GIVEN = (
    "{what} is a state dict (a Mapping, e.g. posterior.state_dict()), not a SWAGPosterior. Build the "
    "posterior from it first: SWAGModule(model, SWAGPosterior.from_state_dict(state)) (a file written "
    "with posterior.save(path): SWAGPosterior.load(path))."
)


class BMA:
    """Bayesian model averaging over posterior samples, callable on a batch's inputs.

    Args:
        model: the trained network (any ``nn.Module``, also compiled) giving raw outputs (logits for
            classification); never modified.
        posterior: the :class:`SWAGPosterior` collected for ``model`` (e.g. ``swag.posterior``), or
            several independent ones (MultiSWAG: ``num_samples`` are drawn from each). ``None`` if
            it is set later (``bma.posteriors = [...]``).
        num_samples: weight samples per posterior.
        scale: covariance scale (``0.5`` = the paper's ``1/√2``). ``scale=0`` with
            ``num_samples=1`` is exactly the SWA model.
        task: what the outputs are: ``"regression"`` (``mean``, ``std``); ``"classification"``
            (logits, softmax over the class dimension: ``mean`` probabilities, ``std``, ``entropy``,
            ``mutual_information``); ``"binary"`` (one logit per row, sigmoid) or ``"multilabel"``
            (an independent sigmoid per label), with the same outputs per element; or your own
            :class:`~lightning_swag.likelihoods.Likelihood` instance. ``None`` infers it from the
            model (:func:`~lightning_swag.likelihoods.infer_task`).
        covariance: ``"low_rank"`` (full SWAG) or ``"diagonal"`` (SWAG-Diagonal).
        return_samples: also return the per-sample outputs ``samples`` ``[S, B, ...]``.
        seed: an int >= 0 that fixes the weight samples: the same seed gives the same samples
            whatever ``chunk_size``, the number of batches or of processes. Within one run the same
            weight samples are used for every batch. ``None`` draws a fresh seed per run.
        chunk_size: samples drawn and evaluated together (default: as many as fit in about
            256 MiB of weights). It bounds the memory of the weights and of the outputs (the
            summaries are accumulated chunk by chunk unless ``return_samples``); the results do not
            depend on it.
        vectorize: ``"auto"`` (see :mod:`lightning_swag.predictive.vectorize`), ``"vmap"`` or
            ``"loop"`` (``True``/``False``): how the samples of a chunk run.
        bn_loader: training data (a loader, or a LightningDataModule whose ``train_dataloader``
            is used) to recompute BatchNorm running statistics for every weight sample before
            predicting (``torch.optim.swa_utils.update_bn`` semantics). Without it the model's own,
            stale statistics are used (a warning says so). The model's buffers are never modified.
        bn_num_batches: use only this many batches (an int) or this fraction (a float in (0, 1])
            of ``bn_loader`` for the refresh.
        output_transform: maps the model's raw output to the tensor to average (e.g.
            ``lambda out: out[0]``); outputs with a ``logits`` entry (Hugging Face) need none. With
            ``noise="heteroscedastic"`` it may return a ``(mean, variance)`` pair of tensors.
        noise: a regression's noise model (:mod:`lightning_swag.likelihoods.gaussian`): ``None``, a
            float ``σ > 0`` (``fit_noise`` sets it) or ``"heteroscedastic"`` (mean and log-variance).
        memory_format: the layout of 4-D tensors of conv nets: ``"auto"`` (channels-last on a CPU
            when a trial forward shows the model accepts it), ``"channels_last"`` or ``"preserve"``.
        class_dim: the class dimension of classification outputs with more than two dimensions:
            ``1`` for ``[B, C, H, W]`` (segmentation), ``-1`` for ``[B, T, C]`` (tokens). Without it
            such an output is an error.
        ignore_index: targets equal to this are skipped by test metrics and ``tune_scale`` (padding).
        predictive: ``"sampled"`` (Monte Carlo over weight samples), ``"linearized"`` (outputs
            linear in the weights around the SWA mean, see
            :mod:`lightning_swag.predictive.linearized`), your own
            :class:`~lightning_swag.predictive.Predictive` instance, or a factory that builds one
            from a :class:`~lightning_swag.predictive.PredictiveContext`.
        link_approx: how the linearised predictive averages a softmax or sigmoid: ``"probit"`` or
            ``"mc"`` (the linearised outputs under the run's ``num_samples`` weight samples, the
            same samples as the sampled predictive's).
        split_forward: run the network once per batch up to the sampled submodule (a head) when its
            output is the model's, checked on every batch (:mod:`lightning_swag.predictive.subset`).
        batch_inputs: the model input of a batch of ``bn_loader`` and of held-out data (see
            :mod:`lightning_swag.predictive.batches`).
        progress: wraps long loops (drawing cached samples, the BatchNorm refresh) in a progress bar.
    """

    num_samples = Option("num_samples")
    scale = Option("scale", resets=False)  # read from the run state: the predictive is kept
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
        posterior: Posterior | Sequence[Posterior] | None = None,
        num_samples: int = 30,
        scale: float = 0.5,
        task: Task | Likelihood | None = None,
        covariance: Covariance = "low_rank",
        return_samples: bool = False,
        seed: int | None = None,
        chunk_size: int | None = None,
        vectorize: Vectorize | bool = "auto",
        bn_loader: Iterable[Any] | None = None,
        bn_num_batches: int | float | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        noise: Noise = None,
        memory_format: MemoryFormat = "auto",
        class_dim: int | None = None,
        ignore_index: int = -100,
        predictive: PredictiveChoice = "sampled",
        link_approx: LinkApprox = "probit",
        split_forward: bool = True,
        batch_inputs: Callable[[Any], Any] = default_batch_inputs,
        progress: Progress | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = unwrap_model(model)
        self.batch_inputs = batch_inputs
        self.progress = progress
        self._built: Predictive | None = None
        self._run_seed: int | None = None
        self._posteriors: list[Posterior] = []
        self._batchnorm = BatchNormPolicy(self.model)
        options = dict(locals())
        for name in self.option_names():
            value = options[name] if name != "task" or task is not None else infer_task(self.model)
            self.__dict__[f"_option_{name}"] = check_option(name, value)
        self.likelihood  # noqa: B018 - the task's options are checked together now
        if self.bn_loader is None:
            tracked = list(posterior.param_shapes) if isinstance(posterior, Posterior) else None
            self._batchnorm.warn_if_stale(tracked, self.split_forward)
        if posterior is not None:
            self.posteriors = [posterior] if isinstance(posterior, Posterior) else posterior

    @classmethod
    def option_names(cls) -> list[str]:
        """The options that can be changed after construction (the arguments but four)."""
        return [name for name, value in vars(BMA).items() if isinstance(value, Option)]

    def options_changed(self, resets: bool) -> None:
        """Called when an option is set: the next call rebuilds the predictive (and draws new samples)."""
        if resets:
            self._built = None

    # ------------------------------------------------------------------ posteriors
    @property
    def posteriors(self) -> list[Posterior]:
        """The posterior(s) sampled from (several for MultiSWAG)."""
        return self._posteriors

    @posteriors.setter
    def posteriors(self, posteriors: Sequence[Posterior]) -> None:
        self._posteriors = _checked_posteriors(posteriors, self.model)
        self._built = None

    @property
    def posterior(self) -> Posterior:
        """The first (usually only) posterior."""
        self.require_posteriors()
        return self._posteriors[0]

    def require_posteriors(self) -> None:
        """Raise a ``RuntimeError`` that says how to give one when there is no posterior yet."""
        if not self._posteriors:
            raise RuntimeError(
                "SWAGModule has no posterior: pass posterior=swag.posterior, or restore it with "
                "trainer.predict(module, ckpt_path=...) from a checkpoint written with SWAGCallback."
            )

    @property
    def total_samples(self) -> int:
        """Weight samples per prediction: ``num_samples`` times the number of posteriors (``0`` for the
        linearised predictive in closed form, ``link_approx="probit"``, which draws none)."""
        if not self.predictor.uses_weight_samples:
            return 0
        return self.num_samples * len(self._posteriors)

    @property
    def execution_plan(self) -> ExecutionPlan | None:
        """How the forward passes run (vmap or loop, channels-last, the split), once decided at the
        first batch; ``None`` before."""
        return self._built.plan if self._built is not None else None

    @property
    def likelihood(self) -> Likelihood:
        """What the outputs mean: the likelihood of ``task`` (with ``noise``, ``class_dim``,
        ``ignore_index``)."""
        if self._built is not None:
            return self._built.likelihood
        return likelihood_for(self.task, self.noise, self.class_dim, self.ignore_index)

    @property
    def predictor(self) -> Predictive:
        """The predictive of the current options (built at the first call after an option changed)."""
        self.require_posteriors()
        if self._built is None:
            self._posteriors = [sharded_for(post, self.model) for post in self._posteriors]
            posteriors = self._sampled(self._posteriors)
            loader = resolve_loader(self.bn_loader, "train") if self.bn_loader is not None else None
            in_place = any(layout_of(post).forward_in_place for post in posteriors)
            refresh = self._batchnorm.refresh(
                loader, self.bn_num_batches, self.batch_inputs, self.progress, in_place
            )
            context = PredictiveContext(
                likelihood=self.likelihood,
                posteriors=posteriors,
                model=self.model,
                runner_options=self._runner_options(),
                batchnorm=refresh,
                progress=self.progress,
                link_approx=self.link_approx,
            )
            self._built = build_predictive(self.predictive, context)
        return self._built

    # ------------------------------------------------------------------ prediction
    def __call__(self, inputs: Any) -> dict[str, Tensor]:
        """The BMA summary at ``inputs`` (``mean``, ``std``, ...; + ``samples`` when ``return_samples``)."""
        return self.summarize(inputs, keep_samples=self.return_samples)

    def summarize(self, inputs: Any, keep_samples: bool) -> dict[str, Tensor]:
        """The BMA summary at ``inputs`` (``keep_samples``: with the per-sample entries)."""
        predictive = self.predictor
        with torch.no_grad(), eval_mode(self.model):
            out = predictive.predict(inputs, self.run_state(), keep_samples)
            if self.bn_loader is None and self._batchnorm.order_unknown:
                plan = self.execution_plan
                tracked = WeightStream(self._posteriors, self.model).tracked_names
                self._batchnorm.check_order(tracked, inputs, plan is not None and plan.split is not None)
        return out

    @torch.no_grad()
    def sample_outputs(self, inputs: Any) -> Any:
        """Model outputs at ``inputs`` under every weight sample, stacked: ``[S, B, ...]`` (a pair of
        such tensors when a heteroscedastic ``output_transform`` returns ``(mean, variance)``); the
        linearised outputs under the same samples for ``predictive="linearized"``."""
        predictive = self.predictor
        with eval_mode(self.model):
            return stack_outputs(list(predictive.outputs(inputs, self.run_state())))

    @torch.no_grad()
    def components(self, inputs: Any) -> tuple[Tensor, Tensor | None]:
        """The predictive's components at ``inputs`` (see :meth:`Predictive.components`)."""
        predictive = self.predictor
        with eval_mode(self.model):
            return predictive.components(inputs, self.run_state())

    def sample_components(self, inputs: Any) -> tuple[Tensor, Tensor]:
        """Per-weight-sample predictive means and noise variances ``[S, B, ...]`` of a regression with
        a noise model (the components of the predictive mixture)."""
        components = getattr(self.likelihood, "components", None)
        if components is None:
            raise ValueError(
                "sample_components needs a noise model: SWAGModule(..., noise=σ or 'heteroscedastic'), "
                "or fit_noise(held_out_loader) first."
            )
        return components(self.sample_outputs(inputs))

    def iter_weight_samples(self) -> Iterator[dict[str, Tensor]]:
        """Weight samples as ``{name: [chunk, *shape]}`` dicts on the model's device, each tensor in its
        parameter's dtype. Sample ``i`` of posterior ``j`` is sample ``i`` of the seed
        ``derive_seed(run seed, j)``; for FSDP2 shards, this process's shards of the samples."""
        self.require_posteriors()
        stream = WeightStream(
            self._sampled([sharded_for(p, self.model) for p in self._posteriors]), self.model
        )
        yield from stream.chunks(self.spec(), self.current_seed())

    # ------------------------------------------------------------------ runs and seeds
    def spec(self) -> SamplingSpec:
        """The sampling options of a run."""
        return SamplingSpec(self.num_samples, self.scale, self.chunk_size)

    def _sampled(self, posteriors: list[Posterior]) -> list[Posterior]:
        """The posteriors the predictive samples: their ``diagonal()`` for ``covariance="diagonal"``."""
        if self.covariance != "diagonal":
            return posteriors
        return [diagonal_of(post, f"posterior {i}") for i, post in enumerate(posteriors)]

    def current_seed(self) -> int:
        """The run's seed: ``seed``, or one drawn at the first call of the run."""
        if self._run_seed is None:
            shared = any(layout_of(post).is_sharded for post in self._posteriors)
            self._run_seed = self.seed if self.seed is not None else draw_run_seed(shared)
        return self._run_seed

    def run_state(self) -> RunState:
        return RunState(self.spec(), self.current_seed())

    def reset_samples(self) -> None:
        """Draw a new set of weight samples at the next batch (a fixed one when ``seed`` is set)."""
        self._run_seed = None
        if self._built is not None:
            self._built.reset()

    def start_run(self, shared_seed: Callable[[], int] | None = None) -> Predictive:
        """Start a run (e.g. ``trainer.predict``): new samples (those of ``seed`` when set, else of
        ``shared_seed()``, the same seed on every process) drawn for every batch of it; returns the
        predictive, whose ``start_run`` has run on this process."""
        self.reset_samples()
        if self.seed is None and shared_seed is not None:
            self._run_seed = shared_seed()
        predictive = self.predictor
        predictive.start_run(self.run_state())
        return predictive

    # ------------------------------------------------------------------ held-out tuning
    @torch.no_grad()
    def tune_scale(
        self, batches: Sequence[tuple[Any, Any]], scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0)
    ) -> dict[float, float]:
        """Set ``scale`` to the candidate with the lowest predictive negative log-likelihood on the
        held-out ``(inputs, targets)`` batches, and return ``{scale: mean NLL}`` (see
        :func:`lightning_swag.predictive.tuning.tune_scale`). Every candidate is scored with the same
        weight-sample noise. Classification scores the BMA probabilities; regression needs a noise
        model and scores the predictive mixture; with a homoscedastic ``noise=σ``, σ is refit for
        every candidate (scale and σ trade off). A warning says so when the best is at the edge."""
        likelihood = self.likelihood
        seed = self.current_seed()

        def predict(inputs: Any, scale: float) -> dict[str, Tensor]:
            self.scale = scale
            self._run_seed = seed
            return self.summarize(inputs, keep_samples=likelihood.needs_samples)

        scores, best, fitted = tuning.tune_scale(predict, likelihood, batches, scales)
        self.scale = best
        if "noise" in fitted:
            self.noise = fitted["noise"]
        self._run_seed = seed
        return scores

    @torch.no_grad()
    def fit_noise(self, batches: Sequence[tuple[Any, Any]]) -> float:
        """Set a homoscedastic ``noise`` σ by maximum likelihood of the predictive mixture on the
        held-out ``(inputs, targets)`` batches, and return it (see
        :func:`lightning_swag.predictive.tuning.fit_noise`)."""
        if not self.likelihood.fits_noise:
            raise ValueError(
                "fit_noise fits the homoscedastic σ of a regression, but this module's likelihood is "
                f"{type(self.likelihood).__name__} (task={self.likelihood.task!r}, noise={self.noise!r}); "
                "with noise='heteroscedastic' the model predicts its own noise."
            )
        sigma = tuning.fit_noise(self.components, batches)
        self.noise = sigma
        return sigma

    # ------------------------------------------------------------------ execution choices
    def _runner_options(self) -> dict[str, Any]:
        tracked = WeightStream(self._posteriors, self.model).tracked_names
        return {
            "output_transform": self.output_transform,
            "vectorize": self.vectorize,
            "memory_format": self.memory_format,
            "split_forward": self.split_forward
            and self._batchnorm.allows_split(tracked, self.bn_loader is not None),
        }


def _checked_posteriors(posteriors: Sequence[Posterior], model: nn.Module) -> list[Posterior]:
    """``posteriors`` as a list, each checked against ``model`` (see :func:`_check_posterior`)."""
    if isinstance(posteriors, Mapping):  # iterating it would give its keys
        raise TypeError(_STATE_DICT_GIVEN.format(what="posterior"))
    posteriors = list(posteriors)
    if not posteriors:
        raise ValueError("Give at least one SWAGPosterior.")
    for i, post in enumerate(posteriors):
        _check_posterior(i, post, model)
    if any(getattr(post, "num_snapshots", None) == 1 for post in posteriors):
        warnings.warn(
            "SWAGModule: a posterior holds one snapshot only, so it has no spread: every weight sample is "
            "its SWA mean and the std of the BMA is exactly 0. Collect more snapshots (SWAGCallback's "
            "start_epoch, every_n_epochs / every_n_steps).",
            stacklevel=5,
        )
    return posteriors


def _check_posterior(index: int, post: Any, model: nn.Module) -> None:
    """Refuse a posterior that cannot be sampled for ``model``, saying why and how to fix it."""
    if isinstance(post, Mapping):
        raise TypeError(_STATE_DICT_GIVEN.format(what=f"posterior {index}"))
    check_posterior(post, f"posterior {index}")
    if getattr(post, "num_snapshots", None) == 0:
        raise ValueError(
            f"posterior {index} holds no snapshots, so there is nothing to sample. Train with "
            "SWAGCallback until at least one snapshot is collected (check start_epoch vs max_epochs)."
        )
    check_fits(post, model)
    layout = layout_of(post)
    if layout.is_sharded and not layout.fits(model):
        raise ValueError(
            f"posterior {index} holds a part of the weights ({layout.describe()}) that does not fit "
            "this model's parameters: predict with the model it was collected from, under the same "
            "strategy, or gather() the posterior to one process first."
        )


def resolve_loader(source: Any, split: str) -> Iterable[Any]:
    """A loader, or the ``<split>_dataloader()`` of a data module (a LightningDataModule, prepared and
    set up for fitting first)."""
    method = getattr(source, f"{split}_dataloader", None)
    if not callable(method):
        return source
    if callable(getattr(source, "prepare_data", None)):
        source.prepare_data()
    if callable(getattr(source, "setup", None)):
        source.setup("fit")
    return method()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; every module's mode restored after it."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
