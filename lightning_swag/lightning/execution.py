"""How a ``SWAGModule`` runs its forward passes: the runner's options, the BatchNorm refresh, the
progress bars and the start and end of a ``trainer.predict`` / ``test`` run (the shared run seed,
DDP lockstep), decided from the module's options and the Trainer it runs under.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_swag.lightning.held_out import resolve_loader
from lightning_swag.posterior.swag import SWAGPosterior
from lightning_swag.predictive.batchnorm import BatchNormRefresh, batchnorm_downstream, has_batchnorm
from lightning_swag.predictive.subset import find_split
from lightning_swag.predictive.weights import WeightStream, draw_run_seed

__all__ = ["ExecutionChoices"]


class ExecutionChoices:
    """The execution helpers of :class:`~lightning_swag.SWAGModule`."""

    def _runner_options(self) -> dict[str, Any]:
        split = self.split_forward
        if split and self.bn_loader is not None and self._batchnorm_outside_split():
            split = False
            rank_zero_info(
                "SWAGModule: the rest of the network is run for every sample too, because it has BatchNorm "
                "layers that bn_loader refreshes."
            )
        return {
            "output_transform": self.output_transform,
            "vectorize": self.vectorize,
            "memory_format": self.memory_format,
            "split_forward": split,
        }

    def _batchnorm_outside_split(self) -> bool:
        candidate = find_split(self.model, WeightStream(self._posteriors, self.model).tracked_names)
        if candidate is None:
            return True
        inside = {id(m) for m in candidate.submodule.modules()}
        return any(
            has_batchnorm(m) and id(m) not in inside for m in self.model.modules() if not list(m.children())
        )

    def _batchnorm_refresh(self, posteriors: list[SWAGPosterior]) -> BatchNormRefresh | None:
        if self.bn_loader is None or not has_batchnorm(self.model):
            return None
        if any(post.layout.forward_in_place for post in posteriors):
            raise ValueError(
                "SWAGModule: the BatchNorm refresh (bn_loader) is not supported with FSDP2-sharded models "
                "yet; leave bn_loader unset, or predict with the unsharded model."
            )
        loader = resolve_loader(self.bn_loader, "train")
        return BatchNormRefresh(loader, self.bn_num_batches, self.batch_inputs, self._progress)

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

    def _warn_if_batchnorm_is_stale(self, posterior: Any) -> None:
        self._batchnorm_order_unknown = False
        if self.bn_loader is not None or not has_batchnorm(self.model):
            return
        if isinstance(posterior, SWAGPosterior) and self.split_forward:
            candidate = find_split(self.model, [n for n in posterior.param_shapes])
            if candidate is not None and not has_batchnorm(candidate.submodule):
                # BatchNorm outside the sampled submodule is stale only where it runs after it: the
                # first batch shows (_check_batchnorm_order).
                self._batchnorm_order_unknown = True
                return
        _warn_stale_batchnorm(type(self.model).__name__, [])

    def _check_batchnorm_order(self, inputs: Any) -> None:
        """At the first batch, when construction could not tell: warn when a BatchNorm layer runs after
        a tracked parameter (its inputs then depend on the samples). A kept split proves there is none
        (the model's output is the sampled submodule's)."""
        if not self._batchnorm_order_unknown:
            return
        self._batchnorm_order_unknown = False
        plan = self.execution_plan
        if self.bn_loader is not None or (plan is not None and plan.split is not None):
            return
        tracked = WeightStream(self._posteriors, self.model).tracked_names
        late = batchnorm_downstream(self.model, tracked, inputs)
        if late:
            _warn_stale_batchnorm(type(self.model).__name__, late)

    def _start_run(self) -> None:
        """Every process draws the same weight samples (global rank 0's run seed), and processes whose
        forward passes are collectives run the same number of them."""
        self.reset_samples()
        trainer = self.trainer
        if self.seed is None:
            self._run_seed = draw_run_seed(shared=trainer.world_size > 1)
        predictive = self._predictive()
        predictive.start_run(self._run_state())
        collective = trainer.world_size > 1 and predictive.collective_forwards(self._spec())
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
        self._lockstep.finish(lambda x: self._summarize(x, keep_samples=False), self.trainer.global_rank)


def _warn_stale_batchnorm(model_name: str, layers: list[str]) -> None:
    where = f" ({', '.join(repr(n) for n in layers)} after the sampled weights)" if layers else ""
    warnings.warn(
        f"SWAGModule: {model_name} has BatchNorm layers{where} but no bn_loader was given, so every weight "
        "sample is run with the running statistics of the trained model, which do not match the sampled "
        "weights. Pass bn_loader=<training loader or DataModule> to recompute them.",
        stacklevel=4,
    )
