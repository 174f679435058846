"""``SWAGModule``: Bayesian model averaging with a SWAG posterior, as a LightningModule.

The averaging is :class:`~lightning_swag.predictive.bma.BMA` (plain torch), which the module holds
as :attr:`SWAGModule.engine` and whose options it exposes as its own attributes. This module adds
what needs a Trainer: the hooks of ``trainer.predict`` / ``trainer.test`` (the shared run seed, DDP
lockstep, per-dataloader test metrics), held-out tuning from a loader or a DataModule, progress
bars and the posteriors in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeGuard

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_swag.lightning.checkpoint_io import readable_checkpoint_errors
from lightning_swag.lightning.lockstep import Lockstep
from lightning_swag.likelihoods import PER_SAMPLE_KEYS, Likelihood, LinkApprox, Noise, Task, TestMetrics
from lightning_swag.posterior.format import (
    MODULE_POSTERIORS_KEY,
    add_module_extra_placeholder,
    module_extra_state,
    pop_module_extra_state,
    posterior_states,
    read_module_extra_state,
    wrapped_model_state,
)
from lightning_swag.posterior.protocol import Posterior
from lightning_swag.posterior.swag import SWAGPosterior
from lightning_swag.predictive.batches import default_batch_inputs, default_batch_targets
from lightning_swag.predictive.bma import BMA, resolve_loader
from lightning_swag.predictive.options import Covariance, PredictiveChoice
from lightning_swag.predictive.runner import ExecutionPlan, MemoryFormat
from lightning_swag.predictive.vectorize import Vectorize
from lightning_swag.predictive.weights import draw_run_seed

__all__ = ["SWAGModule"]


class EngineOption:
    """An option of :class:`~lightning_swag.predictive.bma.BMA`, read and set on the module (checked
    by the engine when set)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: Any, owner: type | None = None) -> Any:
        if module is None:
            return self
        return getattr(module.engine, self.name)

    def __set__(self, module: Any, value: Any) -> None:
        setattr(module.engine, self.name, value)


class SWAGModule(L.LightningModule):
    """Bayesian model averaging with SWAG posterior samples, for ``trainer.predict`` / ``trainer.test``.

    The arguments are those of :class:`~lightning_swag.predictive.bma.BMA` (documented there), which
    does the averaging; every option is also an attribute (``bma.scale = 1.0`` takes effect at the
    next call). ``bn_loader`` may also be a LightningDataModule (its ``train_dataloader``). A
    ``posterior`` of ``None`` is restored from a checkpoint (``trainer.predict(..., ckpt_path=...)``).

    Batches are read with :meth:`batch_inputs` and :meth:`batch_targets`: override them for other
    layouts. Sharded posteriors (``SWAGCallback(shard=True)`` under DDP, or FSDP2 under
    ``ModelParallelStrategy``) predict under the strategy they were collected with, with the same
    seed on every process; ``bn_loader`` is not supported with FSDP2 yet.
    """

    num_samples = EngineOption()
    scale = EngineOption()
    task = EngineOption()
    covariance = EngineOption()
    return_samples = EngineOption()
    seed = EngineOption()
    chunk_size = EngineOption()
    vectorize = EngineOption()
    bn_loader = EngineOption()
    bn_num_batches = EngineOption()
    output_transform = EngineOption()
    noise = EngineOption()
    memory_format = EngineOption()
    class_dim = EngineOption()
    ignore_index = EngineOption()
    predictive = EngineOption()
    link_approx = EngineOption()
    split_forward = EngineOption()

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
        bn_loader: Iterable[Any] | L.LightningDataModule | None = None,
        bn_num_batches: int | float | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        noise: Noise = None,
        memory_format: MemoryFormat = "auto",
        class_dim: int | None = None,
        ignore_index: int = -100,
        predictive: PredictiveChoice = "sampled",
        link_approx: LinkApprox = "probit",
        split_forward: bool = True,
    ) -> None:
        super().__init__()
        options = {name: value for name, value in locals().items() if name in BMA.option_names()}
        engine = BMA(model, posterior, **options, batch_inputs=self.batch_inputs, progress=self._progress)
        self.model = engine.model
        self.engine = engine
        """The plain-torch BMA that averages (see :class:`~lightning_swag.predictive.bma.BMA`)."""
        self._lockstep = Lockstep()
        self._test_metrics = nn.ModuleDict()

    @classmethod
    def option_names(cls) -> list[str]:
        """The options that can be changed after construction (every argument but model and posterior)."""
        return BMA.option_names()

    # ------------------------------------------------------------------ posteriors
    @property
    def posteriors(self) -> list[Posterior]:
        """The posterior(s) sampled from (several for MultiSWAG)."""
        return self.engine.posteriors

    @posteriors.setter
    def posteriors(self, posteriors: Sequence[Posterior]) -> None:
        self.engine.posteriors = posteriors

    @property
    def posterior(self) -> Posterior:
        """The first (usually only) posterior."""
        return self.engine.posterior

    @property
    def total_samples(self) -> int:
        """Weight samples per prediction (see :attr:`BMA.total_samples`)."""
        return self.engine.total_samples

    @property
    def execution_plan(self) -> ExecutionPlan | None:
        """How the forward passes run (vmap or loop, channels-last, the split), once decided at the
        first batch; ``None`` before."""
        return self.engine.execution_plan

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
        self._lockstep.record(x)
        return self.engine(x)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """One dict per batch: ``mean``, ``std`` (+ ``entropy``, ``mutual_information`` for
        classification, + ``epistemic_std``, ``aleatoric_std`` for a regression with a noise model,
        + ``samples`` when ``return_samples``)."""
        return self(self.batch_inputs(batch))

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
        likelihood = self.engine.likelihood
        inputs = self.batch_inputs(batch)
        self._lockstep.record(inputs)
        out = self.engine.summarize(inputs, keep_samples=self.return_samples or likelihood.needs_samples)
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

    def _test_metrics_for(
        self, dataloader_idx: int, out: dict[str, Tensor], likelihood: Likelihood
    ) -> TestMetrics:
        key = str(dataloader_idx)
        if key not in self._test_metrics:
            self._test_metrics[key] = likelihood.test_metrics(out).to(out["mean"].device)
        return self._test_metrics[key]  # type: ignore[return-value]

    def sample_outputs(self, x: Any) -> Any:
        """Model outputs for ``x`` under every weight sample, stacked (see :meth:`BMA.sample_outputs`)."""
        self._lockstep.record(x)
        return self.engine.sample_outputs(x)

    def sample_components(self, x: Any) -> tuple[Tensor, Tensor]:
        """Per-weight-sample predictive means and noise variances (see :meth:`BMA.sample_components`)."""
        self._lockstep.record(x)
        return self.engine.sample_components(x)

    def iter_weight_samples(self) -> Iterator[dict[str, Tensor]]:
        """Weight samples as ``{name: [chunk, *shape]}`` dicts (see :meth:`BMA.iter_weight_samples`)."""
        return self.engine.iter_weight_samples()

    def reset_samples(self) -> None:
        """Draw a new set of weight samples at the next batch (a fixed one when ``seed`` is set)."""
        self.engine.reset_samples()

    # ------------------------------------------------------------------ held-out tuning
    def tune_scale(
        self,
        dataloader: Iterable[Any] | L.LightningDataModule,
        scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    ) -> dict[float, float]:
        """Set ``scale`` to the candidate with the lowest predictive negative log-likelihood on held-out
        data (see :meth:`BMA.tune_scale`); choose it on a validation set, never on the test set.

        Args:
            dataloader: labelled held-out batches (read with :meth:`batch_inputs` and
                :meth:`batch_targets`; kept in memory while the candidates are scored), or a
                LightningDataModule whose ``val_dataloader`` is used.
            scales: candidate scales (each ``>= 0``).

        Returns:
            ``{scale: mean NLL}`` for every candidate.
        """
        return self.engine.tune_scale(self._held_out(dataloader, "tune_scale"), scales)

    def fit_noise(self, dataloader: Iterable[Any] | L.LightningDataModule) -> float:
        """Set a homoscedastic ``noise`` σ by maximum likelihood of the predictive mixture on held-out
        data and return it (see :meth:`BMA.fit_noise`); fit it on validation data, never on the test set.

        Args:
            dataloader: labelled held-out batches, or a LightningDataModule (its ``val_dataloader``).
        """
        return self.engine.fit_noise(self._held_out(dataloader, "fit_noise"))

    def _held_out(self, dataloader: Any, what: str) -> list[tuple[Any, Any]]:
        """The labelled batches of a loader or DataModule (its validation loader), on the model's device."""
        self.engine.require_posteriors()
        device = next(iter(self.model.parameters())).device
        batches = [
            (
                move_data_to_device(self.batch_inputs(batch), device),
                move_data_to_device(self.batch_targets(batch), device),
            )
            for batch in resolve_loader(dataloader, "val")
        ]
        if not batches:
            raise ValueError(f"{what} got an empty dataloader.")
        return batches

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
    def on_test_epoch_start(self) -> None:
        self._test_metrics = nn.ModuleDict()

    @override
    def on_predict_epoch_end(self) -> None:
        self._finish_run()

    @override
    def on_test_epoch_end(self) -> None:
        self._finish_run()

    def _start_run(self) -> None:
        """Every process draws the same weight samples (global rank 0's run seed), and processes whose
        forward passes are collectives run the same number of them."""
        trainer = self.trainer
        predictive = self.engine.start_run(lambda: draw_run_seed(shared=trainer.world_size > 1))
        collective = trainer.world_size > 1 and predictive.collective_forwards(self.engine.spec())
        counts = trainer.num_predict_batches if trainer.predicting else trainer.num_test_batches

        def reduce_max(value: float) -> float:
            return float(trainer.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="max"))

        if not self._lockstep.start(collective, float(sum(counts)), reduce_max):
            rank_zero_warn(
                "SWAGModule: a process has a dataloader without a length, so the processes cannot be kept "
                "in step; with a sharded posterior give every process the same number of batches, or the "
                "run hangs."
            )

    def _finish_run(self) -> None:
        self._lockstep.finish(
            lambda x: self.engine.summarize(x, keep_samples=False), self.trainer.global_rank
        )

    def _progress(
        self, iterable: Iterable[Any], total: int | None, description: str = "SWAG: sampling weights"
    ) -> Iterable[Any]:
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

    # ------------------------------------------------------------------ checkpoints
    @override
    def get_extra_state(self) -> dict[str, Any]:
        """The whole posteriors' states, so that a ``SWAGModule`` nested in another LightningModule
        keeps them in that module's checkpoint (sharded ones are gathered by
        :meth:`on_save_checkpoint` instead, a collective)."""
        posteriors = self.engine.posteriors
        if not posteriors or not _storable(posteriors) or any(post.is_sharded for post in posteriors):
            return module_extra_state([])
        return module_extra_state([post.state_dict() for post in posteriors])

    @override
    def set_extra_state(self, state: Any) -> None:
        states = read_module_extra_state(state)
        if states:
            self.posteriors = [SWAGPosterior.from_state_dict(s, device="cpu") for s in states]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pop_module_extra_state(checkpoint.get("state_dict", {}))  # stored once, under its own key
        if not _storable(self.engine.posteriors):
            rank_zero_warn(
                "SWAGModule: the checkpoint holds no posterior, because a posterior of your own type is not "
                "a SWAGPosterior; give it to SWAGModule again when you restore from this checkpoint."
            )
            return
        # sharded posteriors are gathered to rank 0, which writes the checkpoint (a collective)
        wholes = [post.gather(dst=0) for post in self.engine.posteriors]
        if all(whole is not None for whole in wholes):
            checkpoint[MODULE_POSTERIORS_KEY] = [whole.state_dict() for whole in wholes if whole is not None]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept a checkpoint of the wrapped model's own training run (with SWAGCallback state) as
        well as a SWAGModule checkpoint: the model weights and the posterior(s) are restored."""
        if checkpoint.get("state_dict"):
            own = set(self.state_dict(keep_vars=True))
            checkpoint["state_dict"] = dict(wrapped_model_state(checkpoint["state_dict"], own, "model."))
        if "state_dict" in checkpoint:
            add_module_extra_placeholder(checkpoint["state_dict"])
        source = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        states = posterior_states(checkpoint)
        if states:
            if self.engine.posteriors:
                rank_zero_warn(
                    f"SWAGModule: the checkpoint's {len(states)} posterior(s) replaces the posterior(s) given "
                    "to SWAGModule; build SWAGModule(model, posterior=None) to restore from the checkpoint "
                    "silently, or leave out ckpt_path to keep yours."
                )
            self.posteriors = [SWAGPosterior.from_state_dict(s, device="cpu", source=source) for s in states]
        elif not self.engine.posteriors:
            raise RuntimeError(_no_posterior_message(checkpoint))


def _storable(posteriors: Sequence[Any]) -> TypeGuard[Sequence[SWAGPosterior]]:
    """Whether the checkpoint format can store ``posteriors`` (SWAG posteriors; a user's own type has
    no stored form)."""
    return all(isinstance(post, SWAGPosterior) for post in posteriors)


def _no_posterior_message(checkpoint: dict[str, Any]) -> str:
    if "callbacks" not in checkpoint and "optimizer_states" not in checkpoint:
        return (
            "The checkpoint holds only weights (it was written with ModelCheckpoint(save_weights_only=True) or "
            "trainer.save_checkpoint(..., weights_only=True)), and a weights-only checkpoint holds no callback "
            "state, so no SWAG posterior. Save checkpoints with save_weights_only=False next to SWAGCallback, "
            "or pass the posterior to SWAGModule (swag.posterior, or SWAGPosterior.load(path))."
        )
    return (
        "The checkpoint holds no SWAG posterior (it was not saved by a Trainer with SWAGCallback, or before "
        "the first snapshot), and SWAGModule was built without one."
    )
