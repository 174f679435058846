"""``SWAGModule``: Bayesian model averaging over SWAG weight samples, as a LightningModule.

Each batch is run through ``num_samples`` weight vectors drawn from the posterior, with
``torch.func.functional_call`` (the model is never copied or modified), in chunks that keep memory
bounded; :mod:`lightning_swag.vectorize` decides whether the samples of a chunk run as one
``vmap`` call or as a loop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics import MeanMetric, MeanSquaredError, Metric
from typing_extensions import override

from lightning_swag.batches import default_batch_inputs, default_batch_targets
from lightning_swag.batchnorm import batches_to_use, has_batchnorm, refresh_batchnorm_batched
from lightning_swag.callback import readable_checkpoint_errors
from lightning_swag.checkpoint import MODULE_POSTERIORS_KEY, posterior_states
from lightning_swag.metrics import (
    RegressionUncertaintyMetrics,
    UncertaintyMetrics,
    fit_gaussian_noise,
    gaussian_mixture_nll,
    nll,
)
from lightning_swag.posterior import SWAGPosterior, canonical_name, derive_seed, unwrap_model
from lightning_swag.sharding import all_gather_columns, has_dtensor_parameters, reshard_fsdp
from lightning_swag.summaries import (
    heteroscedastic_mean_variance,
    summarize_classification,
    summarize_gaussian_mixture,
    summarize_regression,
)
from lightning_swag.vectorize import OutputTypeError, SampleMap, Vectorize, choose_vectorization

__all__ = ["SWAGModule", "infer_task"]

Task = Literal["regression", "classification"]
Covariance = Literal["low_rank", "diagonal"]
Noise = float | Literal["heteroscedastic"] | None
MemoryFormat = Literal["auto", "channels_last", "preserve"]
_REGRESSION_TEST_KEYS = (
    "nll",
    "rmse",
    "crps",
    "calibration_error",
    "mean_std",
    "coverage_50",
    "coverage_90",
    "coverage_95",
)

# Upper bound on the bytes of one chunk of sampled weights, used to pick a chunk size.
_CHUNK_BYTES = 256 * 2**20
# Weight samples of a run are kept between batches when all of them fit in this many bytes;
# larger sets are redrawn from the same seed for every batch.
_CACHE_BYTES = 512 * 2**20
_MAX_SEED = 2**63 - 1


def infer_task(model: nn.Module) -> Task:
    """The BMA task of ``model``: its ``task`` attribute when it is ``"regression"`` or
    ``"classification"``, ``"classification"`` for a model with a ``num_classes`` hyperparameter,
    else ``"regression"``. Used by the CLI and the prediction writer."""
    task = getattr(model, "task", None)
    if task in ("regression", "classification"):
        return task
    hparams = getattr(model, "hparams", {})
    return "classification" if "num_classes" in hparams else "regression"


class _MetricValue(Metric):
    """One value of a dict-valued metric (e.g. ``UncertaintyMetrics``), so that Lightning can log it
    per dataloader with ``self.log``; ``update`` only counts, the source holds the state."""

    full_state_update = False

    def __init__(self, source: Metric, key: str) -> None:
        super().__init__()
        self._source = [source]  # a list: not registered as a child module, not synced twice
        self.key = key

    def update(self) -> None:
        """Nothing to accumulate: the source metric is updated by its owner."""

    def compute(self) -> Tensor:
        return self._source[0].compute()[self.key]

    def reset(self) -> None:
        super().reset()
        self._source[0].reset()


class SWAGModule(L.LightningModule):
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
        task: ``"regression"`` (outputs ``mean``, ``std``) or ``"classification"`` (softmax
            ``mean``, ``std``, ``entropy``, ``mutual_information``); ``None`` infers it from the
            model (:func:`infer_task`: its ``task`` attribute, or ``"classification"`` when it has a
            ``num_classes`` hyperparameter, else ``"regression"``).
        covariance: ``"low_rank"`` (full SWAG) or ``"diagonal"`` (SWAG-Diagonal).
        return_samples: also return the per-sample outputs ``samples`` ``[S, B, ...]``.
        seed: an int >= 0 that fixes the weight samples: the same seed gives the same samples
            whatever ``chunk_size``, the number of batches or of processes. Within one run the same
            weight samples are used for every batch. ``None`` draws a fresh seed per run (the same
            on every process under DDP).
        chunk_size: samples drawn and evaluated together (default: as many as fit in about
            256 MiB of weights). Memory only: the results do not depend on it.
        vectorize: how the samples of a chunk run: ``"auto"`` (a loop on the CPU, ``torch.func.vmap``
            on accelerators; see :mod:`lightning_swag.vectorize`), or force ``"vmap"`` / ``"loop"``
            (``True``/``False`` mean the same). Both give the same predictions.
        bn_loader: training data (a loader, or a LightningDataModule whose ``train_dataloader``
            is used) to recompute BatchNorm running statistics for every weight sample before
            predicting (``torch.optim.swa_utils.update_bn`` semantics). Sampled weights were never
            run forward during training, so without this the model's own, stale statistics are used
            (a warning says so). The model's own buffers are never modified.
        bn_num_batches: use only this many batches (an int) or this fraction (a float in (0, 1])
            of ``bn_loader`` for the refresh.
        output_transform: maps the model's raw output to the tensor to average, for models whose
            ``forward`` returns a tuple, a dict or an object (e.g. ``lambda out: out["logits"]``).
            It runs once per weight sample. With ``noise="heteroscedastic"`` it may instead return
            a ``(mean, variance)`` pair of tensors.
        noise: the noise model of a regression (``task="regression"``), for a predictive with a
            likelihood. ``None``: the spread of the sampled outputs only (epistemic). A float
            ``σ > 0``: homoscedastic Gaussian noise (``fit_noise`` sets it by maximum likelihood).
            ``"heteroscedastic"``: the model predicts its own noise; the last dimension of its
            output is 2, holding the mean and the log-variance (or ``output_transform`` returns a
            ``(mean, variance)`` pair). The predictive is then the equal-weight mixture of
            ``N(mean_s, variance_s)`` over the weight samples ``s``, and the output has ``mean``,
            ``std`` (total), ``epistemic_std`` (spread of the sample means) and ``aleatoric_std``
            (root of the mean noise variance); ``return_samples`` adds ``samples`` (the sample
            means) and ``sample_variances``.
        memory_format: the layout of 4-D tensors in the forward passes of conv nets. ``"auto"``: on a
            CPU, for a model with ``Conv2d`` layers and 4-D inputs, the inputs and the sampled conv
            weights go channels-last (oneDNN's fast convolutions: 1.5-1.9x on a LeNet-style net
            here; on ResNet-18 about 5% slower, the cost of copying the sampled conv weights),
            unless a trial forward pass on two inputs at the first batch fails (e.g. a ``.view``
            that needs contiguous activations); elsewhere nothing changes.
            ``"channels_last"`` forces it, ``"preserve"`` keeps the tensors as they come. Results
            agree to float rounding.

    Batch layout: inputs and targets are found by :meth:`batch_inputs` and :meth:`batch_targets`
    (default: ``batch[0]`` and ``batch[1]`` of a tuple/list, or a bare input tensor). Override these
    two methods for other layouts; prediction, ``trainer.test``, :meth:`tune_scale`, the BatchNorm
    refresh and :class:`~lightning_swag.SWAGPredictionWriter` all use them.

    Sharded posteriors (``SWAGCallback(shard=True)`` under DDP, or FSDP2 under
    ``ModelParallelStrategy``; see :mod:`lightning_swag.sharding`) predict under the strategy they
    were collected with, in ``trainer.predict`` / ``trainer.test``, with the same seed on every
    process (rank 0's, broadcast). DDP: each process draws its columns of the samples and the columns
    are all-gathered into whole samples once per run (per batch when they exceed 512 MiB). FSDP2:
    each process draws the samples of its own parameter shards and copies them into the model's
    local shards in place, one sample at a time (``functional_call`` and ``vmap`` do not work on
    FSDP2 modules), restoring the trained shards afterwards; an unsharded posterior given with an
    FSDP2 model keeps each process's part. The posterior is never joined. Every process
    runs the same number of forward passes (short ones repeat their last batch at the end).
    ``bn_loader`` is not supported with FSDP2 yet.
    """

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
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
        _check_scale(scale)
        if task not in ("regression", "classification", None):
            raise ValueError(f"task must be 'regression', 'classification' or None, got {task!r}.")
        if covariance not in ("low_rank", "diagonal"):
            raise ValueError(f"covariance must be 'low_rank' or 'diagonal', got {covariance!r}.")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}.")
        if seed is not None and (
            not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED
        ):
            raise ValueError(f"seed must be an int in [0, 2**63 - 1] or None, got {seed!r}.")
        if vectorize not in ("auto", "vmap", "loop", True, False):
            raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop' (or a bool), got {vectorize!r}.")
        if output_transform is not None and not callable(output_transform):
            raise TypeError(
                f"output_transform must be callable or None, got {type(output_transform).__name__}."
            )
        if bn_num_batches is not None and (
            isinstance(bn_num_batches, bool)
            or not isinstance(bn_num_batches, (int, float))
            or not (bn_num_batches >= 1 if isinstance(bn_num_batches, int) else 0 < bn_num_batches <= 1)
        ):
            raise ValueError(
                f"bn_num_batches must be an int >= 1, a float in (0, 1] or None, got {bn_num_batches!r}."
            )
        _check_noise(noise)
        if memory_format not in ("auto", "channels_last", "preserve"):
            raise ValueError(
                f"memory_format must be 'auto', 'channels_last' or 'preserve', got {memory_format!r}."
            )
        self.model = unwrap_model(model)
        self.num_samples = num_samples
        self.scale = float(scale)
        self.task: Task = task if task is not None else infer_task(self.model)
        if noise is not None and self.task != "regression":
            raise ValueError(
                f"noise={noise!r} is a noise model for regression, but task is {self.task!r}. Leave noise=None "
                "for classification (the softmax is its likelihood), or pass task='regression'."
            )
        self.noise: Noise = float(noise) if isinstance(noise, (int, float)) else noise
        self.memory_format = memory_format
        self._channels_last: bool | None = None  # decided at the first batch
        self._conv_weights = {
            f"{name}.weight" if name else "weight"
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Conv2d)
        }
        self.covariance = covariance
        self.return_samples = return_samples
        self.seed = seed
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.bn_loader = bn_loader
        self.bn_num_batches = bn_num_batches
        self.output_transform = output_transform
        # canonical parameter name (as the posterior knows it) -> name inside self.model
        self._model_names = {canonical_name(n): n for n, _ in self.model.named_parameters()}
        self._has_batchnorm = has_batchnorm(self.model)
        if self._has_batchnorm and bn_loader is None:
            warnings.warn(
                f"SWAGModule: {type(self.model).__name__} has BatchNorm layers but no bn_loader was given, so "
                "every weight sample is run with the running statistics of the trained model, which do not "
                "match the sampled weights. Pass bn_loader=<training loader or DataModule> to recompute them.",
                stacklevel=2,
            )
        self._posteriors: list[SWAGPosterior] = []
        if posterior is not None:
            self.posteriors = [posterior] if isinstance(posterior, SWAGPosterior) else list(posterior)
        self._sample_map: SampleMap | None = None
        self._run_seed: int | None = None
        self._sample_cache: list[dict[str, Tensor]] | None = None
        self._bn_cache: dict[int, dict[str, Tensor]] = {}
        self._test_metrics = nn.ModuleDict()
        # sharded prediction: every process must run the same collectives (see _prepare_sharded_run)
        self._lockstep = False
        self._lockstep_batches = 0
        self._batches_run = 0
        self._last_inputs: Any = None

    # ------------------------------------------------------------------ posteriors
    @property
    def posteriors(self) -> list[SWAGPosterior]:
        """The posterior(s) sampled from (several for MultiSWAG)."""
        return self._posteriors

    @posteriors.setter
    def posteriors(self, posteriors: Sequence[SWAGPosterior]) -> None:
        if not posteriors:
            raise ValueError("Give at least one SWAGPosterior.")
        for i, post in enumerate(posteriors):
            if not isinstance(post, SWAGPosterior):
                raise TypeError(f"posterior {i} is a {type(post).__name__}, not a SWAGPosterior.")
            if post.num_snapshots == 0:
                raise ValueError(
                    f"posterior {i} holds no snapshots, so there is nothing to sample. Train with "
                    "SWAGCallback until at least one snapshot is collected (check start_epoch vs max_epochs)."
                )
            post.check_compatible(self.model)
            if post.layout is not None and (post.layout.kind == "fsdp2") != has_dtensor_parameters(
                self.model
            ):
                raise ValueError(
                    f"posterior {i} holds a part of the weights ({post.layout.describe()}) that does not fit "
                    "this model's parameters: predict with the model it was collected from, under the same "
                    "strategy, or gather() the posterior to one process first."
                )
        self._posteriors = list(posteriors)
        self.reset_samples()

    @property
    def posterior(self) -> SWAGPosterior:
        """The first (usually only) posterior."""
        self._require_posteriors()
        return self._posteriors[0]

    @property
    def total_samples(self) -> int:
        return self.num_samples * len(self._posteriors)

    # ------------------------------------------------------------------ batch layout
    def batch_inputs(self, batch: Any) -> Any:
        """The model input of a batch (default: the batch if it is a tensor, else ``batch[0]``).
        Override for other batch layouts."""
        return default_batch_inputs(batch)

    def batch_targets(self, batch: Any) -> Any:
        """The targets of a labelled batch (default: ``batch[1]``). Override for other layouts."""
        return default_batch_targets(batch)

    # ------------------------------------------------------------------ prediction
    @override
    def forward(self, x: Any) -> dict[str, Tensor]:
        """BMA summary of the outputs for input ``x`` (see :meth:`predict_step`)."""
        if self.task == "classification" or self.noise is None:
            outputs = self.sample_outputs(x)
            summary = (
                summarize_classification(outputs)
                if self.task == "classification"
                else summarize_regression(outputs)
            )
            if self.return_samples:
                summary["samples"] = outputs
            return summary
        means, variances = self.sample_components(x)
        summary = summarize_gaussian_mixture(means, variances)
        if self.return_samples:
            summary["samples"] = means
            summary["sample_variances"] = variances.expand_as(means)
        return summary

    def sample_components(self, x: Any) -> tuple[Tensor, Tensor]:
        """Per-weight-sample predictive means and noise variances ``[S, B, ...]`` of a regression with
        a noise model (the components of the predictive mixture)."""
        if self.noise is None:
            raise ValueError(
                "sample_components needs a noise model: SWAGModule(..., noise=σ or 'heteroscedastic'), "
                "or fit_noise(held_out_loader) first."
            )
        outputs = self.sample_outputs(x)
        if self.noise == "heteroscedastic":
            if isinstance(outputs, tuple):
                means, variances = outputs
                if bool((variances < 0).any()):
                    raise ValueError("output_transform returned negative variances; return (mean, variance).")
                return means, variances
            return heteroscedastic_mean_variance(outputs)
        assert isinstance(self.noise, float)
        return outputs, torch.full((), self.noise**2, dtype=outputs.dtype, device=outputs.device)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """One dict per batch: ``mean``, ``std`` (+ ``entropy``, ``mutual_information`` for
        classification, + ``epistemic_std``, ``aleatoric_std`` for a regression with a noise model,
        + ``samples`` when ``return_samples``)."""
        return self(self.batch_inputs(batch))

    @override
    def setup(self, stage: str) -> None:
        readable_checkpoint_errors(self.trainer.strategy)

    @override
    def on_predict_start(self) -> None:
        self._start_run()

    @override
    def on_test_start(self) -> None:
        self._start_run()

    def _start_run(self) -> None:
        self.reset_samples()
        if self.seed is None and self.trainer.world_size > 1:
            # Every process must draw the same weight samples: global rank 0 picks the run seed.
            self._run_seed = int(self.trainer.strategy.broadcast(self._fresh_seed(), src=0))
        self._prepare_sharded_run()

    @override
    def configure_model(self) -> None:
        """Nothing to do: the wrapped model arrives as trained (``ModelParallelStrategy`` requires this
        hook; an FSDP2 model keeps its shards)."""

    def _prepare_sharded_run(self) -> None:
        """Sharded posteriors, at the start of a run, on every process: an FSDP2 model gets this
        process's part of every posterior; DDP slices are joined into whole samples now (once per run)
        when they fit the sample cache. Otherwise every batch runs collectives, so every process must
        run the same number of them (:meth:`_finish_lockstep`)."""
        self._lockstep, self._batches_run, self._last_inputs = False, 0, None
        self._lockstep_batches = 0
        if has_dtensor_parameters(self.model):
            if self.bn_loader is not None and self._has_batchnorm:
                raise ValueError(
                    "SWAGModule: the BatchNorm refresh (bn_loader) is not supported with FSDP2-sharded models "
                    "yet; leave bn_loader unset, or predict with the unsharded model."
                )
            reshard_fsdp(self.model)
            self._posteriors = [
                post
                if post.is_sharded
                else SWAGPosterior.from_state_dict(post.state_dict(), device=post.device, model=self.model)
                for post in self._posteriors
            ]
            self._lockstep = self.trainer.world_size > 1
        elif any(post.is_sharded for post in self._posteriors):
            itemsize = self._model_dtype().itemsize
            if (
                itemsize * sum(self.num_samples * post.num_params for post in self._posteriors)
                <= _CACHE_BYTES
            ):
                self._sample_cache = list(self.iter_weight_samples())
            else:
                self._lockstep = self.trainer.world_size > 1
        if self._lockstep:
            # Lightning's prediction sampler may give processes different numbers of batches
            trainer = self.trainer
            counts = trainer.num_predict_batches if trainer.predicting else trainer.num_test_batches
            mine = torch.tensor(float(sum(counts)), device=self.device)
            most = float(trainer.strategy.reduce(mine, reduce_op="max"))
            if not math.isfinite(most):
                self._lockstep = False
                rank_zero_warn(
                    "SWAGModule: a process has a dataloader without a length, so the processes cannot be kept "
                    "in step; with a sharded posterior give every process the same number of batches, or the "
                    "run hangs."
                )
            self._lockstep_batches = int(most)

    def _finish_lockstep(self) -> None:
        """Processes that ran fewer batches than others repeat their last one (the result is dropped),
        so that every process joins the same collectives, in the same order."""
        if not self._lockstep:
            return
        missing = self._lockstep_batches - self._batches_run
        if missing > 0 and self._last_inputs is None:
            raise RuntimeError(
                f"SWAGModule: process {self.trainer.global_rank} had no batch while others had "
                f"{self._lockstep_batches}; with a sharded posterior every process needs at least one batch."
            )
        for _ in range(missing):
            self.sample_outputs(self._last_inputs)

    @override
    def on_predict_epoch_end(self) -> None:
        self._finish_lockstep()

    @override
    def on_test_epoch_end(self) -> None:
        self._finish_lockstep()

    def reset_samples(self) -> None:
        """Draw a new set of weight samples at the next batch (a fixed one when ``seed`` is set)."""
        self._run_seed = None
        self._sample_cache = None
        self._bn_cache = {}

    def _fresh_seed(self) -> int:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        if any(post.is_sharded for post in self._posteriors) and torch.distributed.is_initialized():
            # the processes' parts of a sample only fit together when they come from the same seed
            box = [seed]
            torch.distributed.broadcast_object_list(box, src=0)
            seed = int(box[0])
        return seed

    @torch.no_grad()
    def sample_outputs(self, x: Any) -> Tensor:
        """Model outputs for ``x`` under every weight sample, stacked: ``[S, B, ...]`` (a pair of such
        tensors when a heteroscedastic ``output_transform`` returns ``(mean, variance)``).

        The model runs in eval mode (dropout off, BatchNorm on running statistics); the train/eval
        mode of each of its modules is restored afterwards.
        """
        self._require_posteriors()
        if self._lockstep:
            self._batches_run, self._last_inputs = self._batches_run + 1, x
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            return self._sample_outputs(x)
        finally:
            for module, training in modes.items():
                module.training = training

    def _sample_outputs(self, x: Any) -> Tensor:
        channels_last = self._use_channels_last(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        chunks = self._sample_cache
        if chunks is None:
            chunks = self.iter_weight_samples()
            if channels_last:
                chunks = map(self._conv_weights_channels_last, chunks)
            itemsize = self._model_dtype().itemsize
            total_bytes = itemsize * sum(self.num_samples * post.num_params for post in self._posteriors)
            if total_bytes <= _CACHE_BYTES:
                chunks = self._sample_cache = list(
                    self._progress(chunks, self._num_chunks(), "SWAG: sampling weights (chunks)")
                )
        outputs = [
            self._forward_chunk(params, x, self._batchnorm_buffers(i, params))
            for i, params in enumerate(chunks)
        ]
        if len(outputs) == 1:
            return outputs[0]
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts, dim=0) for parts in zip(*outputs, strict=True))  # type: ignore[return-value]
        return torch.cat(outputs, dim=0)

    def iter_weight_samples(self) -> Iterator[dict[str, Tensor]]:
        """Weight samples as ``{name: [chunk, *shape]}`` dicts on the model's device and dtype.

        Sample ``i`` of posterior ``j`` is sample ``i`` of the seed ``derive_seed(run seed, j)``
        (see :meth:`SWAGPosterior.sample`), so neither the chunking nor the batches change it. For a
        posterior of FSDP2 shards the tensors are this process's shards of the samples.
        """
        if self._run_seed is None:
            self._run_seed = self.seed if self.seed is not None else self._fresh_seed()
        device, dtype = self._model_device(), self._model_dtype()
        for index, post in enumerate(self._posteriors):
            posterior_seed = derive_seed(self._run_seed, index)
            chunk = self._chunk_size(post)
            for start in range(0, self.num_samples, chunk):
                num = min(chunk, self.num_samples - start)
                yield self._draw_samples(post, num, posterior_seed, start, dtype, device)

    def _draw_samples(
        self, post: SWAGPosterior, num: int, seed: int, start: int, dtype: torch.dtype, device: torch.device
    ) -> dict[str, Tensor]:
        """Samples ``start … start + num − 1`` of ``post`` as ``{model name: [num, *shape]}``. A DDP slice's
        columns are joined across processes (a collective); FSDP2 shards stay local."""
        kwargs: dict[str, Any] = {
            "scale": self.scale,
            "seed": seed,
            "first_sample": start,
            "diagonal_only": self.covariance == "diagonal",
            "dtype": dtype,
            "device": device,
        }
        if post.layout is None:
            parts = post.unflatten(post.sample(num, **kwargs))
        elif post.layout.kind == "fsdp2":
            parts = post.unflatten_local(post.sample_local(num, **kwargs))
        else:
            parts = post.unflatten(all_gather_columns(post.sample_local(num, **kwargs), post.layout))
        return {self._model_names[n]: v for n, v in parts.items()}

    def _use_channels_last(self, x: Any) -> bool:
        """Whether this run's forward passes use channels-last 4-D tensors (see ``memory_format``)."""
        if self._channels_last is None:  # decided once per module, at its first batch
            self._channels_last = self._decide_channels_last(x)
        return self._channels_last and isinstance(x, Tensor) and x.dim() == 4

    def _decide_channels_last(self, x: Any) -> bool:
        if self.memory_format == "preserve" or has_dtensor_parameters(self.model):
            return False
        eligible = isinstance(x, Tensor) and x.dim() == 4 and bool(self._conv_weights)
        if self.memory_format == "channels_last":
            if not eligible:
                raise ValueError(
                    "memory_format='channels_last' needs a model with Conv2d layers and 4-D inputs; use 'auto'."
                )
            return True
        if not eligible or self._model_device().type != "cpu":
            return False
        # A trial on two inputs with the model's own weights laid out as the samples will be: does its
        # forward accept channels-last activations (a .view() may not)?
        weights_cl = {
            name: p.detach().contiguous(memory_format=torch.channels_last)
            for name, p in self.model.named_parameters()
            if name in self._conv_weights and p.dim() == 4
        }
        try:
            functional_call(self.model, weights_cl, (x[:2].contiguous(memory_format=torch.channels_last),))
        except Exception:  # noqa: BLE001 - e.g. a .view() that needs contiguous activations
            return False
        return True

    def _conv_weights_channels_last(self, sampled: dict[str, Tensor]) -> dict[str, Tensor]:
        """The chunk with every sampled ``Conv2d`` weight ``[S, O, I, kh, kw]`` laid out so that each
        sample's ``[O, I, kh, kw]`` slice is channels-last.

        The samples are fresh tensors of this run, so each weight is rewritten in its own storage: the
        extra memory is one weight's copy, not a second copy of the chunk.
        """
        return {
            name: _channels_last_in_place(value) if name in self._conv_weights and value.dim() == 5 else value
            for name, value in sampled.items()
        }

    def _model_device(self) -> torch.device:
        return next(iter(self.model.parameters())).device

    def _model_dtype(self) -> torch.dtype:
        return next(iter(self.model.parameters())).dtype

    def _chunk_size(self, post: SWAGPosterior) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        budget = _CHUNK_BYTES // (self._model_dtype().itemsize * post.num_params)
        return max(1, min(self.num_samples, budget))

    def _num_chunks(self) -> int:
        return sum(-(-self.num_samples // self._chunk_size(post)) for post in self._posteriors)

    def _progress(self, iterable: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
        """A progress bar over ``iterable`` while a Trainer with a progress bar runs this module
        (global rank zero only), shown only when there is more than one step."""
        trainer = self._trainer
        show = (
            trainer is not None
            and trainer.progress_bar_callback is not None
            and trainer.is_global_zero
            and (total is None or total > 1)
        )
        if not show:
            return iterable
        from tqdm.auto import tqdm  # here: importing tqdm.auto warns in notebooks without ipywidgets

        return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)

    def _batchnorm_buffers(self, chunk_index: int, sampled: dict[str, Tensor]) -> dict[str, Tensor]:
        """BatchNorm statistics recomputed for one chunk of samples (cached for the run)."""
        if not self._has_batchnorm or self.bn_loader is None:
            return {}
        if chunk_index not in self._bn_cache:
            loader = self._resolve_loader(self.bn_loader, "train")
            total = len(loader) if hasattr(loader, "__len__") else None
            limit = batches_to_use(loader, self.bn_num_batches)
            if limit is not None:
                total = limit if total is None else min(total, limit)
            self._bn_cache[chunk_index] = refresh_batchnorm_batched(
                self.model,
                sampled,
                self._progress(loader, total, f"SWAG: BatchNorm refresh, sample chunk {chunk_index + 1}"),
                self.bn_num_batches,
                batch_inputs=self.batch_inputs,
                vectorize=self._mapper().mode,
            )
        return self._bn_cache[chunk_index]

    @staticmethod
    def _resolve_loader(source: Any, split: Literal["train", "val"]) -> Iterable[Any]:
        """A loader, or a DataModule's training / validation loader."""
        if isinstance(source, L.LightningDataModule):
            source.prepare_data()
            source.setup("fit")
            return source.train_dataloader() if split == "train" else source.val_dataloader()
        return source

    def _mapper(self) -> SampleMap:
        if self._sample_map is None:
            self._sample_map = SampleMap(
                choose_vectorization(self.vectorize, self._model_device()), "SWAGModule"
            )
        return self._sample_map

    def _model_output(self, raw: Any) -> Tensor | tuple[Tensor, Tensor]:
        """The tensor to average from one forward pass (through ``output_transform`` when given)."""
        if self.output_transform is not None:
            raw = self.output_transform(raw)
        if (
            self.noise == "heteroscedastic"
            and isinstance(raw, tuple)
            and len(raw) == 2
            and all(isinstance(part, Tensor) for part in raw)
        ):
            return raw  # (mean, variance)
        if not isinstance(raw, Tensor):
            hint = (
                "output_transform returned"
                if self.output_transform is not None
                else f"{type(self.model).__name__}.forward returned"
            )
            raise OutputTypeError(
                f"SWAGModule averages tensors, but {hint} a {type(raw).__name__}. Pass "
                "SWAGModule(..., output_transform=f) with f mapping the model's output to the tensor to average, "
                "e.g. output_transform=lambda out: out[0] or lambda out: out['logits']."
            )
        return raw

    def _forward_chunk(self, sampled: dict[str, Tensor], x: Any, buffers: dict[str, Tensor]) -> Tensor:
        if has_dtensor_parameters(self.model):
            return self._forward_chunk_in_place(sampled, x)
        base = {name: p.detach() for name, p in self.model.named_parameters()}
        base.update(dict(self.model.named_buffers()))

        def run_sample(weights: dict[str, Tensor], bufs: dict[str, Tensor], inputs: Any) -> Tensor:
            return self._model_output(functional_call(self.model, {**base, **weights, **bufs}, (inputs,)))

        return self._mapper()(run_sample, sampled, buffers, x, model_name=type(self.model).__name__)

    def _forward_chunk_in_place(self, sampled: dict[str, Tensor], x: Any) -> Tensor:
        """FSDP2 models: ``functional_call`` and ``vmap`` fail on them (mixed Tensor/DTensor), so each
        sample's shards are copied into the parameters' local shards and the model runs as usual, one
        sample at a time; the trained shards are put back afterwards (one extra copy of them)."""
        reshard_fsdp(self.model)
        params = dict(self.model.named_parameters())
        shards = {name: params[name].to_local() for name in sampled}
        trained = {name: shard.clone() for name, shard in shards.items()}

        def run_sample(weights: dict[str, Tensor], bufs: dict[str, Tensor], inputs: Any) -> Tensor:
            for name, value in weights.items():
                shards[name].copy_(value)
            try:
                return self._model_output(self.model(inputs))
            finally:
                reshard_fsdp(self.model)  # else the root group's next forward reuses stale unsharded weights

        try:
            return SampleMap("loop", "SWAGModule")(run_sample, sampled, {}, x)
        finally:
            for name, shard in shards.items():
                shard.copy_(trained[name])

    # ------------------------------------------------------------------ test metrics
    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """BMA on a labelled batch; metrics are logged per test dataloader at the end of the epoch.

        Classification: ``test_accuracy``, ``test_nll``, ``test_brier``, ``test_ece`` (15 bins),
        ``test_entropy`` and ``test_mutual_information`` of the BMA probabilities.
        Regression: ``test_rmse`` of the BMA mean and ``test_mean_std``; with a noise model also
        the mixture's ``test_nll``, ``test_crps``, ``test_calibration_error`` (mean absolute
        miscalibration over quantile levels 0.05..0.95) and ``test_coverage_50/90/95`` of the
        central intervals (see :class:`~lightning_swag.metrics.RegressionUncertaintyMetrics`). With several test
        dataloaders the names get Lightning's ``/dataloader_idx_<k>`` suffix, and each loader's
        values are those of testing it alone.
        """
        targets = self.batch_targets(batch)
        inputs = self.batch_inputs(batch)
        if self.task == "regression" and self.noise is not None:
            means, variances = self.sample_components(inputs)
            out = summarize_gaussian_mixture(means, variances)
            metrics = self._test_metrics_for(dataloader_idx, out)
            targets = self._regression_targets(targets, out["mean"])
            metrics["source"].update(means, variances, targets)
        else:
            out = self(inputs)
            metrics = self._test_metrics_for(dataloader_idx, out)
            if self.task == "classification":
                metrics["source"].update(out["mean"], targets)
                metrics["mutual_information"].update(out["mutual_information"])
            else:
                targets = self._regression_targets(targets, out["mean"])
                metrics["rmse"].update(out["mean"], targets)
                metrics["mean_std"].update(out["std"])
        for metric in metrics.values():
            if isinstance(metric, _MetricValue):
                metric.update()
        for key, metric in metrics.items():
            if key != "source":
                self.log(
                    f"test_{key}",
                    metric,
                    on_step=False,
                    on_epoch=True,
                    metric_attribute=f"_test_metrics.{dataloader_idx}.{key}",
                )
        return out

    @override
    def on_test_epoch_start(self) -> None:
        self._test_metrics = nn.ModuleDict()

    def _test_metrics_for(self, dataloader_idx: int, out: dict[str, Tensor]) -> nn.ModuleDict:
        key = str(dataloader_idx)
        if key not in self._test_metrics:
            metrics: dict[str, Metric]
            if self.task == "classification":
                source: Metric = UncertaintyMetrics(num_classes=out["mean"].shape[-1])
                metrics = {"source": source}
                metrics.update(
                    {k: _MetricValue(source, k) for k in ("accuracy", "nll", "brier", "ece", "entropy")}
                )
                metrics["mutual_information"] = MeanMetric()
            elif self.noise is not None:
                source = RegressionUncertaintyMetrics()
                metrics = {"source": source, **{k: _MetricValue(source, k) for k in _REGRESSION_TEST_KEYS}}
            else:
                metrics = {"rmse": MeanSquaredError(squared=False), "mean_std": MeanMetric()}
            self._test_metrics[key] = nn.ModuleDict(metrics).to(out["mean"].device)
        return self._test_metrics[key]  # type: ignore[return-value]

    @staticmethod
    def _regression_targets(targets: Tensor, mean: Tensor) -> Tensor:
        if targets.shape == mean.shape:
            return targets
        if (
            targets.numel() == mean.numel()
            and targets.shape[0] == mean.shape[0]
            and mean.shape[1:].numel() == 1
        ):
            return targets.reshape(mean.shape)  # [B] targets for [B, 1] outputs
        raise ValueError(
            f"Regression targets of shape {tuple(targets.shape)} do not match the model's outputs of shape "
            f"{tuple(mean.shape)}: give one target per output (or override SWAGModule.batch_targets)."
        )

    # ------------------------------------------------------------------ held-out tuning
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
        differs), so the comparison is not blurred by sampling noise. Classification scores the
        NLL of the BMA probabilities; regression needs a noise model and scores the NLL of the
        predictive mixture. With a homoscedastic ``noise=σ``, σ is refit by maximum likelihood for
        every candidate (scale and σ trade off) and the best pair is kept.

        Args:
            dataloader: labelled held-out batches (read with :meth:`batch_inputs` and
                :meth:`batch_targets`; kept in memory while the candidates are scored), or a
                LightningDataModule whose ``val_dataloader`` is used.
            scales: candidate scales (each ``>= 0``). A warning says so when the best one is the
                largest (or the smallest non-zero) candidate.

        Returns:
            ``{scale: mean NLL}`` for every candidate.
        """
        if self.task == "regression" and self.noise is None:
            raise ValueError(
                "tune_scale needs a likelihood: for regression pass a noise model, SWAGModule(..., "
                "noise=σ or noise='heteroscedastic'), or call fit_noise(held_out_loader) first."
            )
        candidates = [float(s) for s in scales]
        if not candidates or not all(math.isfinite(s) and s >= 0 for s in candidates):
            raise ValueError(f"scales must be a non-empty sequence of finite numbers >= 0, got {scales!r}.")
        batches = self._held_out(dataloader, "tune_scale")
        run_seed = self.seed if self.seed is not None else self._fresh_seed()
        scores: dict[float, float] = {}
        fitted_noise: dict[float, float] = {}
        for scale in candidates:
            self.scale = scale
            self.reset_samples()
            self._run_seed = run_seed
            if self.task == "classification":
                total, count = 0.0, 0
                for inputs, targets in batches:
                    total += float(nll(self(inputs)["mean"], targets).double()) * targets.numel()
                    count += targets.numel()
                scores[scale] = total / count
                continue
            means, variances, targets = self._held_out_components(batches)
            if not (bool(torch.isfinite(means).all()) and bool(torch.isfinite(variances).all())):
                scores[scale] = math.inf  # so large a scale that outputs overflow: the worst candidate
                continue
            if isinstance(self.noise, float):
                fitted_noise[scale] = fit_gaussian_noise(means, targets)
                variances = torch.full((), fitted_noise[scale] ** 2, dtype=means.dtype, device=means.device)
            scores[scale] = float(gaussian_mixture_nll(means, variances, targets))
        self.scale = min(scores, key=scores.__getitem__)
        if fitted_noise:
            self.noise = fitted_noise[self.scale]
        self.reset_samples()
        at_edge = self.scale == max(candidates) or (self.scale == min(candidates) and self.scale > 0)
        if len(set(candidates)) > 1 and at_edge:
            warnings.warn(
                f"SWAGModule.tune_scale: the best candidate, scale={self.scale:g}, is at the edge of the "
                f"candidates {sorted(set(candidates))}; the optimum may lie beyond it, so widen the range.",
                stacklevel=3,  # past torch.no_grad's wrapper, to the caller
            )
        return scores

    @torch.no_grad()
    def fit_noise(self, dataloader: Iterable[Any] | L.LightningDataModule) -> float:
        """Set a homoscedastic ``noise`` σ by maximum likelihood of the predictive mixture on held-out
        data, and return it (regression; the weight samples are those of ``seed``).

        The predictive is the mixture over weight samples of ``N(mean_s(x), σ²)``; σ maximises its
        likelihood of the held-out targets (:func:`~lightning_swag.metrics.fit_gaussian_noise`).
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
        self.reset_samples()
        if self.seed is not None:
            self._run_seed = self.seed
        outputs = [self.sample_outputs(inputs) for inputs, _ in batches]
        targets = torch.cat(
            [
                self._regression_targets(t, out[0]).reshape(-1)
                for (_, t), out in zip(batches, outputs, strict=True)
            ]
        )
        means = torch.cat([out.reshape(out.shape[0], -1) for out in outputs], dim=1)
        self.noise = fit_gaussian_noise(means, targets)
        return self.noise

    def _held_out(self, dataloader: Any, what: str) -> list[tuple[Any, Tensor]]:
        """The labelled batches of a loader or DataModule (its validation loader), on the model's device."""
        self._require_posteriors()
        device = self._model_device()
        batches = []
        for batch in self._resolve_loader(dataloader, "val"):
            targets = self.batch_targets(batch)
            batches.append((self._to_device(self.batch_inputs(batch), device), targets.to(device)))
        if not batches:
            raise ValueError(f"{what} got an empty dataloader.")
        return batches

    def _held_out_components(self, batches: list[tuple[Any, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample means and variances ``[S, N]`` and targets ``[N]`` over all held-out batches."""
        means, variances, targets = [], [], []
        for inputs, batch_targets in batches:
            m, v = self.sample_components(inputs)
            targets.append(self._regression_targets(batch_targets, m[0]).reshape(-1))
            means.append(m.reshape(m.shape[0], -1))
            variances.append(v.expand_as(m).reshape(m.shape[0], -1))
        return torch.cat(means, dim=1), torch.cat(variances, dim=1), torch.cat(targets)

    @staticmethod
    def _to_device(data: Any, device: torch.device) -> Any:
        from lightning.pytorch.utilities import move_data_to_device

        return move_data_to_device(data, device)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # sharded posteriors are gathered to rank 0, which writes the checkpoint (a collective)
        wholes = [post.gather(dst=0) for post in self._posteriors]
        if all(whole is not None for whole in wholes):
            checkpoint[MODULE_POSTERIORS_KEY] = [whole.state_dict() for whole in wholes if whole is not None]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept a checkpoint of the wrapped model's own training run (with SWAGCallback state) as
        well as a SWAGModule checkpoint: the model weights and the posterior(s) are restored."""
        state = checkpoint.get("state_dict", {})
        own_keys = set(self.state_dict())
        if state and not set(state) <= own_keys:
            prefixed = {f"model.{k}": v for k, v in state.items()}
            if set(prefixed) <= own_keys:
                checkpoint["state_dict"] = prefixed
        states = posterior_states(checkpoint)
        if states:
            if self._posteriors:
                rank_zero_warn(
                    f"SWAGModule: the checkpoint's {len(states)} posterior(s) replaces the posterior(s) given "
                    "to SWAGModule; build SWAGModule(model, posterior=None) to restore from the checkpoint "
                    "silently, or leave out ckpt_path to keep yours."
                )
            self.posteriors = [SWAGPosterior.from_state_dict(s, device="cpu") for s in states]
        elif not self._posteriors:
            raise RuntimeError(
                "The checkpoint holds no SWAG posterior (it was not saved by a Trainer with SWAGCallback, "
                "or before the first snapshot), and SWAGModule was built without one."
            )

    # ------------------------------------------------------------------ helpers
    def _require_posteriors(self) -> None:
        if not self._posteriors:
            raise RuntimeError(
                "SWAGModule has no posterior: pass posterior=swag.posterior, or restore it with "
                "trainer.predict(module, ckpt_path=...) from a checkpoint written with SWAGCallback."
            )


def _check_noise(noise: Any) -> None:
    if noise is None or noise == "heteroscedastic":
        return
    if isinstance(noise, bool) or not (
        isinstance(noise, (int, float)) and math.isfinite(noise) and noise > 0
    ):
        raise ValueError(
            f"noise must be None, a noise standard deviation σ > 0 or 'heteroscedastic', got {noise!r}."
        )


def _check_scale(scale: Any) -> None:
    if isinstance(scale, bool) or not (
        isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0
    ):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}.")


def _channels_last_in_place(weights: Tensor) -> Tensor:
    """``[S, O, I, kh, kw]`` conv weights, each sample's slice contiguous, rewritten in their own
    storage so that each slice has the channels-last strides of ``[O, kh, kw, I]`` in memory; a
    copy where the slices are not contiguous.

    Where a slice is already laid out channels-last (1×1 kernels, one input channel) no element
    moves, but the strides are still set to the canonical channels-last ones: convolution picks
    its kernel from the strides, and ambiguous ones send it to the slow path.
    """
    num, out_ch, in_ch, kh, kw = weights.shape
    to_channels_last = (0, 1, 3, 4, 2)
    if not weights[0].is_contiguous():
        return weights.permute(*to_channels_last).contiguous().permute(0, 1, 4, 2, 3)
    target = weights.as_strided(
        (num, out_ch, kh, kw, in_ch),
        (weights.stride(0), kh * kw * in_ch, kw * in_ch, in_ch, 1),
        weights.storage_offset(),
    )
    if not weights[0].is_contiguous(memory_format=torch.channels_last):  # the elements must move
        target.copy_(weights.permute(*to_channels_last).contiguous())
    return target.permute(0, 1, 4, 2, 3)
