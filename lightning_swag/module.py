"""``SWAGModule``: Bayesian model averaging over SWAG weight samples, as a LightningModule.

Each batch is run through ``num_samples`` weight vectors drawn from the posterior. The forward
passes are vectorised over samples with ``torch.func.functional_call`` + ``vmap`` (the model is
never copied), in chunks that keep memory bounded, with a per-sample fallback for models that
``vmap`` cannot trace.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from lightning_swag.batchnorm import batches_to_use, has_batchnorm, refresh_batchnorm_batched
from lightning_swag.metrics import UncertaintyMetrics, nll
from lightning_swag.posterior import SWAGPosterior
from lightning_swag.summaries import summarize_classification, summarize_regression

__all__ = ["SWAGModule"]

Task = Literal["regression", "classification"]
Covariance = Literal["low_rank", "diagonal"]

# Upper bound on the bytes of one chunk of sampled weights, used to pick a chunk size; a sampled
# weight costs about 12 bytes (the float64 draw and its float32 copy).
_CHUNK_BYTES = 256 * 2**20
_BYTES_PER_SAMPLED_WEIGHT = 12
# Weight samples of a run are kept between batches when all of them fit in this many bytes;
# larger sets are redrawn from the same seed for every batch.
_CACHE_BYTES = 512 * 2**20


def batch_inputs(batch: Any) -> Tensor:
    """The model input of a batch: its first element for a tuple/list, the batch itself for a tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"SWAGModule expects a batch that is a tensor or a tuple/list whose first element is the input "
        f"tensor; got {type(batch).__name__}. Override SWAGModule.batch_inputs for other layouts."
    )


class SWAGModule(L.LightningModule):
    """Bayesian model averaging with SWAG posterior samples, for ``trainer.predict`` / ``trainer.test``.

    Args:
        model: the trained network (any ``nn.Module``/LightningModule whose ``forward`` gives raw
            outputs; logits for classification). It is used as is and never modified.
        posterior: the :class:`SWAGPosterior` collected for ``model`` (e.g. ``swag.posterior``), or
            several independent ones (MultiSWAG: ``num_samples`` are drawn from each). ``None`` if
            it is to be restored from a checkpoint (``trainer.predict(..., ckpt_path=...)``).
        num_samples: weight samples per posterior.
        scale: covariance scale (``0.5`` = the paper's ``1/√2``). ``scale=0`` with
            ``num_samples=1`` is exactly the SWA model.
        task: ``"regression"`` (outputs ``mean``, ``std``) or ``"classification"`` (softmax
            ``mean``, ``std``, ``entropy``, ``mutual_information``).
        covariance: ``"low_rank"`` (full SWAG) or ``"diagonal"`` (SWAG-Diagonal).
        return_samples: also return the per-sample outputs ``samples`` ``[S, B, ...]``.
        seed: makes the weight samples reproducible. Within one run the same weight samples are
            used for every batch, so predictions of different batches come from the same models.
        chunk_size: samples evaluated together in one vectorised call (default: as many as fit in
            about 256 MiB of weights).
        vectorize: use ``torch.func.vmap``; set False to force the per-sample loop.
        bn_loader: training data (a loader of ``(x, ...)`` batches or of tensors, or a
            LightningDataModule whose ``train_dataloader`` is used) to recompute BatchNorm running
            statistics for every weight sample before predicting (``torch.optim.swa_utils.update_bn``
            semantics). Sampled weights were never run forward during training, so without this
            the model's own, stale statistics are used (a warning says so). The model's own
            buffers are never modified.
        bn_num_batches: use only this many batches (an int) or this fraction (a float in (0, 1])
            of ``bn_loader`` for the refresh.
    """

    def __init__(
        self,
        model: nn.Module,
        posterior: SWAGPosterior | Sequence[SWAGPosterior] | None = None,
        num_samples: int = 30,
        scale: float = 0.5,
        task: Task = "regression",
        covariance: Covariance = "low_rank",
        return_samples: bool = False,
        seed: int | None = None,
        chunk_size: int | None = None,
        vectorize: bool = True,
        bn_loader: Iterable[Any] | L.LightningDataModule | None = None,
        bn_num_batches: int | float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}.")
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}.")
        if covariance not in ("low_rank", "diagonal"):
            raise ValueError(f"covariance must be 'low_rank' or 'diagonal', got {covariance!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}.")
        self.model = model
        self.num_samples = num_samples
        self.scale = float(scale)
        self.task = task
        self.covariance = covariance
        self.return_samples = return_samples
        self.seed = seed
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.bn_loader = bn_loader
        self.bn_num_batches = bn_num_batches
        self._has_batchnorm = has_batchnorm(model)
        if self._has_batchnorm and bn_loader is None:
            warnings.warn(
                f"SWAGModule: {type(model).__name__} has BatchNorm layers but no bn_loader was given, so every "
                "weight sample is run with the running statistics of the trained model, which do not match "
                "the sampled weights. Pass bn_loader=<training loader or DataModule> to recompute them.",
                stacklevel=2,
            )
        self._bn_cache: dict[int, dict[str, Tensor]] = {}
        self._posteriors: list[SWAGPosterior] = []
        if posterior is not None:
            self.posteriors = [posterior] if isinstance(posterior, SWAGPosterior) else list(posterior)
        self._run_seed: int | None = None
        self._sample_cache: list[dict[str, Tensor]] | None = None
        self._test_metrics: UncertaintyMetrics | None = None
        self._test_sums: dict[str, Tensor] = {}

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
        self._posteriors = list(posteriors)

    @property
    def posterior(self) -> SWAGPosterior:
        """The first (usually only) posterior."""
        self._require_posteriors()
        return self._posteriors[0]

    @property
    def total_samples(self) -> int:
        return self.num_samples * len(self._posteriors)

    # ------------------------------------------------------------------ prediction
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """BMA summary of the outputs for input ``x`` (see :meth:`predict_step`)."""
        outputs = self.sample_outputs(x)
        summary = (
            summarize_classification(outputs)
            if self.task == "classification"
            else summarize_regression(outputs)
        )
        if self.return_samples:
            summary["samples"] = outputs
        return summary

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """One dict per batch: ``mean``, ``std`` (+ ``entropy``, ``mutual_information`` for
        classification, + ``samples`` when ``return_samples``)."""
        return self(self.batch_inputs(batch))

    def batch_inputs(self, batch: Any) -> Tensor:
        """Extract the model input from a batch; override for custom batch layouts."""
        return batch_inputs(batch)

    def on_predict_start(self) -> None:
        self._start_run()

    def on_test_start(self) -> None:
        self._start_run()

    def _start_run(self) -> None:
        self.reset_samples()
        if self.seed is None and self.trainer.world_size > 1:
            # Every rank must draw the same weight samples: rank 0 picks the run seed.
            self._run_seed = int(self.trainer.strategy.broadcast(self._fresh_seed(), src=0))

    def reset_samples(self) -> None:
        """Draw a new set of weight samples at the next batch (a fixed one when ``seed`` is set)."""
        self._run_seed = None
        self._sample_cache = None
        self._bn_cache = {}

    @staticmethod
    def _fresh_seed() -> int:
        return int(torch.randint(0, 2**62, (1,)).item())

    @torch.no_grad()
    def sample_outputs(self, x: Tensor) -> Tensor:
        """Model outputs for ``x`` under every weight sample, stacked: ``[S, B, ...]``.

        The model runs in eval mode (dropout off, BatchNorm on running statistics); the train/eval
        mode of each of its modules is restored afterwards.
        """
        self._require_posteriors()
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            return self._sample_outputs(x)
        finally:
            for module, training in modes.items():
                module.training = training

    def _sample_outputs(self, x: Tensor) -> Tensor:
        chunks = self._sample_cache
        if chunks is None:
            chunks = self.iter_weight_samples()
            total_bytes = 4 * sum(self.num_samples * post.num_params for post in self._posteriors)
            if total_bytes <= _CACHE_BYTES:
                chunks = self._sample_cache = list(
                    self._progress(chunks, self._num_chunks(), "SWAG: sampling weights (chunks)")
                )
        outputs = [
            self._forward_chunk(params, x, self._batchnorm_buffers(i, params))
            for i, params in enumerate(chunks)
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def iter_weight_samples(self) -> Iterator[dict[str, Tensor]]:
        """Weight samples as ``{name: [chunk, *shape]}`` dicts on the model's device.

        The same seed is reused for every batch of a run, so every batch sees the same models.
        """
        if self._run_seed is None:
            self._run_seed = self.seed if self.seed is not None else self._fresh_seed()
        param = next(iter(self.model.parameters()))
        for index, post in enumerate(self._posteriors):
            generator = torch.Generator(device=post.device)
            generator.manual_seed(self._run_seed + 7919 * index)
            chunk = self._chunk_size(post)
            remaining = self.num_samples
            while remaining > 0:
                n = min(chunk, remaining)
                flat = post.sample(
                    n,
                    scale=self.scale,
                    generator=generator,
                    diagonal_only=self.covariance == "diagonal",
                )
                yield post.unflatten(flat.to(dtype=param.dtype, device=param.device))
                remaining -= n

    def _chunk_size(self, post: SWAGPosterior) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        budget = _CHUNK_BYTES // (_BYTES_PER_SAMPLED_WEIGHT * post.num_params)
        return max(1, min(self.num_samples, budget))

    def _num_chunks(self) -> int:
        return sum(-(-self.num_samples // self._chunk_size(post)) for post in self._posteriors)

    def _progress(self, iterable: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
        """A progress bar over ``iterable`` while a Trainer with a progress bar runs this module
        (rank zero only), shown only when there is more than one step."""
        trainer = self._trainer
        show = (
            trainer is not None
            and trainer.progress_bar_callback is not None
            and trainer.is_global_zero
            and (total is None or total > 1)
        )
        return (
            tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)
            if show
            else iterable
        )

    def _batchnorm_buffers(self, chunk_index: int, sampled: dict[str, Tensor]) -> dict[str, Tensor]:
        """BatchNorm statistics recomputed for one chunk of samples (cached for the run)."""
        if not self._has_batchnorm or self.bn_loader is None:
            return {}
        if chunk_index not in self._bn_cache:
            loader = self._resolve_bn_loader()
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
                vectorize=self.vectorize,
            )
        return self._bn_cache[chunk_index]

    def _resolve_bn_loader(self) -> Iterable[Any]:
        loader = self.bn_loader
        if isinstance(loader, L.LightningDataModule):
            loader.prepare_data()
            loader.setup("fit")
            loader = loader.train_dataloader()
        assert loader is not None
        return loader

    def _forward_chunk(self, sampled: dict[str, Tensor], x: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        base = {name: p.detach() for name, p in self.model.named_parameters()}
        base.update(dict(self.model.named_buffers()))

        def run_one(weights: dict[str, Tensor], bufs: dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(self.model, {**base, **weights, **bufs}, (inputs,))

        if self.vectorize:
            try:
                return vmap(run_one, in_dims=(0, 0, None))(sampled, buffers, x)
            except Exception as err:  # noqa: BLE001 - any tracing failure falls back to the loop
                warnings.warn(
                    f"SWAGModule: torch.func.vmap could not run {type(self.model).__name__} ({err}); "
                    "falling back to one forward pass per sample. Pass vectorize=False to silence this.",
                    stacklevel=2,
                )
                self.vectorize = False
        n = next(iter(sampled.values())).shape[0]
        return torch.stack(
            [
                run_one({k: v[i] for k, v in sampled.items()}, {k: v[i] for k, v in buffers.items()}, x)
                for i in range(n)
            ]
        )

    # ------------------------------------------------------------------ test metrics
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """BMA on a labelled batch ``(x, y, ...)``; metrics are logged at the end of the test epoch.

        Classification: ``test_accuracy``, ``test_nll``, ``test_brier``, ``test_ece`` (15 bins),
        ``test_entropy`` and ``test_mutual_information`` of the BMA probabilities.
        Regression: ``test_rmse`` of the BMA mean and ``test_mean_std``.
        """
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("SWAGModule.test_step needs labelled batches (inputs, targets, ...).")
        targets = batch[1]
        out = self(self.batch_inputs(batch))
        if self.task == "classification":
            if self._test_metrics is None:
                self._test_metrics = UncertaintyMetrics(num_classes=out["mean"].shape[-1]).to(self.device)
            self._test_metrics.update(out["mean"], targets)
            self._accumulate("mutual_information", out["mutual_information"].sum(), len(targets))
        else:
            error = (out["mean"] - targets.reshape(out["mean"].shape)).square().sum()
            self._accumulate("squared_error", error, targets.numel())
            self._accumulate("std", out["std"].sum(), targets.numel())
        return out

    def on_test_epoch_start(self) -> None:
        self._test_sums = {}
        if self._test_metrics is not None:
            self._test_metrics.reset()

    def on_test_epoch_end(self) -> None:
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._test_sums.items()}
        logged: dict[str, Tensor] = {}
        if self._test_metrics is not None:
            logged.update(self._test_metrics.compute())
            logged["mutual_information"] = sums["mutual_information"] / sums["mutual_information_count"]
        if "squared_error" in sums:
            logged["rmse"] = (sums["squared_error"] / sums["squared_error_count"]).sqrt()
            logged["mean_std"] = sums["std"] / sums["std_count"]
        self.log_dict({f"test_{k}": v.float() for k, v in logged.items()}, sync_dist=False)

    def _accumulate(self, name: str, value: Tensor, count: int) -> None:
        value = value.detach().double()
        self._test_sums[name] = self._test_sums.get(name, 0) + value
        self._test_sums[f"{name}_count"] = self._test_sums.get(f"{name}_count", 0) + torch.tensor(
            float(count), dtype=torch.float64, device=value.device
        )

    # ------------------------------------------------------------------ scale selection
    @torch.no_grad()
    def tune_scale(
        self, dataloader: Iterable[Any], scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0)
    ) -> dict[float, float]:
        """Set ``scale`` to the candidate with the lowest BMA negative log-likelihood on held-out data.

        The covariance scale trades calibration against sharpness, and the best value depends on
        the model and the collection learning rate; choose it on a validation set, never on the
        test set. Every candidate is scored with the same standard-normal draws (only their scale
        differs), so the comparison is not blurred by sampling noise.

        Args:
            dataloader: labelled held-out batches ``(inputs, targets, ...)``; they are kept in
                memory while the candidates are scored.
            scales: candidate scales (each ``>= 0``). A warning says so when the best one is the
                largest (or the smallest non-zero) candidate.

        Returns:
            ``{scale: mean NLL}`` for every candidate. Classification only: for regression the
            averaged outputs define no likelihood without a noise model.
        """
        if self.task != "classification":
            raise ValueError(
                "tune_scale needs task='classification': the BMA of a regression model gives a mean "
                "and a spread but no likelihood without a noise model. Choose scale by hand there."
            )
        candidates = [float(s) for s in scales]
        if not candidates or not all(math.isfinite(s) and s >= 0 for s in candidates):
            raise ValueError(f"scales must be a non-empty sequence of finite numbers >= 0, got {scales!r}.")
        self._require_posteriors()
        device = next(iter(self.model.parameters())).device
        batches = []
        for batch in dataloader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("tune_scale needs labelled batches (inputs, targets, ...).")
            batches.append((self.batch_inputs(batch).to(device), batch[1].to(device)))
        if not batches:
            raise ValueError("tune_scale got an empty dataloader.")
        run_seed = self.seed if self.seed is not None else self._fresh_seed()
        scores: dict[float, float] = {}
        for scale in candidates:
            self.scale = scale
            self.reset_samples()
            self._run_seed = run_seed
            total, count = torch.zeros((), dtype=torch.float64, device=device), 0
            for inputs, targets in batches:
                total += nll(self(inputs)["mean"], targets).double() * targets.numel()
                count += targets.numel()
            scores[scale] = float(total / count)
        self.scale = min(scores, key=scores.__getitem__)
        self.reset_samples()
        at_edge = self.scale == max(candidates) or (self.scale == min(candidates) and self.scale > 0)
        if len(set(candidates)) > 1 and at_edge:
            warnings.warn(
                f"SWAGModule.tune_scale: the best candidate, scale={self.scale:g}, is at the edge of the "
                f"candidates {sorted(set(candidates))}; the optimum may lie beyond it, so widen the range.",
                stacklevel=3,  # past torch.no_grad's wrapper, to the caller
            )
        return scores

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["swag_posteriors"] = [post.state_dict() for post in self._posteriors]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept a checkpoint of the wrapped model's own training run (with SWAGCallback state) as
        well as a SWAGModule checkpoint: the model weights and the posterior(s) are restored."""
        state = checkpoint.get("state_dict", {})
        own_keys = set(self.state_dict())
        if state and not set(state) <= own_keys:
            prefixed = {f"model.{k}": v for k, v in state.items()}
            if set(prefixed) <= own_keys:
                checkpoint["state_dict"] = prefixed
        posterior_states = checkpoint.get("swag_posteriors") or [
            value["posterior"]
            for value in checkpoint.get("callbacks", {}).values()
            if isinstance(value, dict) and isinstance(value.get("posterior"), dict)
        ]
        if posterior_states:
            self.posteriors = [SWAGPosterior.from_state_dict(s, device="cpu") for s in posterior_states]
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
