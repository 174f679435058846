"""``SWAGCallback``: decides *when* to snapshot the weights during ``fit`` and carries the posterior
in checkpoints. The statistics themselves live in :class:`~lightning_swag.posterior.swag.SWAGPosterior`."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

import lightning_swag.lightning.callback_state as checkpointing
from lightning_swag.checks import check_choice, check_int, check_positive, parse_dtype
from lightning_swag.lightning.callback_state import CollectionState
from lightning_swag.lightning.checkpoint_io import readable_checkpoint_errors, restore_checkpoint_io
from lightning_swag.lightning.swa_lr import SWALRSchedule
from lightning_swag.posterior.parameters import check_include, check_include_matches, select_parameters
from lightning_swag.posterior.sharding import is_dtensor, reshard_fsdp
from lightning_swag.posterior.swag import SWAGPosterior

__all__ = ["SWAGCallback"]

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")
_MODULE_LOGGING = ("log", "log_dict")
"""The LightningModule's methods Lightning attaches to every callback (``callback_connector.py``)."""


def _sharded_base(strategy: object) -> str | None:
    """The unsupported sharded strategy ``strategy`` is or derives from (matched by class name, so that
    the optional DeepSpeed need not be importable), or None. ``ModelParallelStrategy`` (FSDP2) is
    supported."""
    for cls in type(strategy).__mro__:
        if cls.__name__ in _SHARDED_STRATEGIES:
            return cls.__name__
    return None


def _is_model_parallel(strategy: object) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 / DTensor parameters)."""
    return any(cls.__name__ == "ModelParallelStrategy" for cls in type(strategy).__mro__)


def _spawns_workers(strategy: Strategy) -> bool:
    """Whether ``strategy`` trains in spawned/forked worker processes (``ddp_spawn``, ``ddp_notebook``),
    from which Lightning sends only the weights back. Lightning's launcher class is private, so it is
    recognised by name (a test fails loudly if Lightning renames it)."""
    launcher = getattr(strategy, "launcher", None)
    return any(cls.__name__ == "_MultiProcessingLauncher" for cls in type(launcher).__mro__)


class SWAGCallback(Callback):
    """Collect a SWAG posterior over the weights of any LightningModule during ``trainer.fit``.

    When to snapshot is decided by :meth:`should_update`, with Lightning's ``WeightAveraging``
    convention: it is asked after every optimizer step with the zero-based ``step_idx`` and at the end
    of every training epoch with the zero-based ``epoch_idx``. By default a snapshot is taken at the
    end of epoch ``e`` when ``e >= start_epoch`` and ``(e - start_epoch) % every_n_epochs == 0``; with
    ``every_n_steps`` instead, after every ``every_n_steps``-th optimizer step (``(step_idx + 1) %
    every_n_steps == 0``) from ``start_epoch`` on. Override :meth:`should_update` for any other
    schedule. The optimizer and LR schedule are left alone unless ``swa_lr`` is given.

    The epoch snapshot is taken right after the epoch's last optimizer step, before validation and
    checkpoints, so a checkpoint holds the posterior of its weights. Every ``fit`` in a *new* Trainer
    starts a fresh posterior (the previous one is kept, e.g. for MultiSWAG) unless it resumes from
    a ``ckpt_path``; ``fit`` again on the same Trainer continues it.

    Steps are Lightning's ``global_step`` (every ``optimizer.step()`` counts); a snapshot holds the
    weights right after its step. Weights that became NaN or infinite raise a ``FloatingPointError``
    naming the parameters, and that snapshot is not added. The tracked parameters are decided at the
    first snapshot: those with ``requires_grad=True`` then (or those ``include`` selects), so a
    backbone unfrozen before ``start_epoch`` is tracked, and a warning names a parameter that
    becomes trainable later.

    Sharded statistics (``shard=True`` under DDP; always under ``ModelParallelStrategy`` with
    ``fully_shard``): every process keeps the statistics of its part of the weights; how they are
    saved, gathered and predicted with is in the distributed guide and
    :mod:`lightning_swag.posterior.sharding`. ``FSDPStrategy`` (FSDP1) and DeepSpeed are refused in
    ``setup``; with spawn-based strategies the posterior stays in the worker processes.

    Args:
        start_epoch: first epoch (0-based) whose weights are collected.
        every_n_epochs: collect every this many epochs (default 1 when ``every_n_steps`` is unset).
        every_n_steps: collect every this many optimizer steps instead; exclusive with
            ``every_n_epochs``.
        max_rank: deviation columns kept for the low-rank covariance (``0``: SWAG-Diagonal).
        device: where statistics live (default: the model's device; ``"cpu"`` keeps them off the GPU).
        include: parameter names or shell patterns to track (e.g. ``["head.*"]`` for last-layer
            SWAG; a tied weight matches through any of its names), or a preset: ``"trainable"``
            (the default, every parameter with ``requires_grad=True``) or ``"lora"`` (peft adapters
            and ``modules_to_save``; see :data:`~lightning_swag.posterior.parameters.INCLUDE_PRESETS`).
            Patterns that match no parameter are an error when fit starts.
        moment_dtype: dtype of the mean and the sum of squared deviations (Welford updates keep
            float32 accurate; float64 is the default).
        deviation_dtype: dtype of the deviation buffer.
        swa_lr: if set, switch every optimizer to this learning rate from ``start_epoch`` on
            (torch's ``SWALR``, stepped by the callback at every epoch end, also under manual
            optimization), replacing the user's LR scheduler for the collection phase (see
            :mod:`lightning_swag.lightning.swa_lr`).
        annealing_epochs: epochs to anneal from the current LR to ``swa_lr`` (0: switch at once).
        annealing_strategy: ``"cos"`` or ``"linear"`` annealing.
        shard: under DDP with several processes, keep the statistics of a ``1/world_size`` slice of
            the weights per process (sharded statistics, see above). Ignored with one process, and
            under ``ModelParallelStrategy``, where the statistics are always sharded like the weights.

    Example:
        >>> import lightning as L
        >>> from lightning_swag import SWAGCallback, SWAGModule
        >>> from lightning_swag.experiments.data import SineDataModule
        >>> from lightning_swag.experiments.models import SineRegressor
        >>> swag = SWAGCallback(start_epoch=1, every_n_epochs=1, max_rank=5)
        >>> trainer = L.Trainer(max_epochs=4, callbacks=[swag], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> model, dm = SineRegressor(), SineDataModule()
        >>> trainer.fit(model, datamodule=dm)
        >>> swag.posterior.num_snapshots
        3
    """

    def __init__(
        self,
        start_epoch: int = 0,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        max_rank: int = 20,
        device: str | None = None,
        include: Sequence[str] | str | None = None,
        moment_dtype: Literal["float64", "float32"] = "float64",
        deviation_dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32",
        swa_lr: float | None = None,
        annealing_epochs: int = 0,
        annealing_strategy: Literal["cos", "linear"] = "cos",
        shard: bool = False,
    ) -> None:
        super().__init__()
        owner = "SWAGCallback"
        check_choice("shard", shard, (True, False), owner)
        for name, value, minimum in (("start_epoch", start_epoch, 0), ("max_rank", max_rank, 0)):
            check_int(name, value, minimum, owner=owner)
        check_int("every_n_epochs", every_n_epochs, 1, allow_none=True, owner=owner)
        check_int("every_n_steps", every_n_steps, 1, allow_none=True, owner=owner)
        check_int("annealing_epochs", annealing_epochs, 0, owner=owner)
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError(
                "SWAGCallback: every_n_epochs and every_n_steps are mutually exclusive; set only one."
            )
        self._moment_dtype = parse_dtype("moment_dtype", moment_dtype, ("float64", "float32"), owner)
        self._deviation_dtype = parse_dtype("deviation_dtype", deviation_dtype, owner=owner)
        check_positive("swa_lr", swa_lr, allow_none=True, owner=owner)
        check_choice("annealing_strategy", annealing_strategy, ("cos", "linear"), owner)
        if device is not None:
            torch.device(device)  # raises a clear RuntimeError for a malformed device string
        self.start_epoch = start_epoch
        self.every_n_steps = every_n_steps
        self.every_n_epochs = None if every_n_steps is not None else (every_n_epochs or 1)
        self.max_rank = max_rank
        self.device = device
        self.include = check_include(include, owner)
        self.moment_dtype = moment_dtype
        self.deviation_dtype = deviation_dtype
        self.swa_lr = swa_lr
        self.annealing_epochs = annealing_epochs
        self.annealing_strategy = annealing_strategy
        self.shard = shard
        self._swa_lr = (
            SWALRSchedule(swa_lr, annealing_epochs, annealing_strategy) if swa_lr is not None else None
        )
        self._state = CollectionState()
        self._trainer_ref: Callable[[], Any] | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Bookkeeping of one run: what was collected when, and the SWA learning-rate schedulers."""
        self._current_epoch = 0
        self._state.last_epoch, self._state.last_step, self._state.snapshot_step = -1, 0, -1
        self._warned_untracked: set[str] = set()
        if self._swa_lr is not None:
            self._swa_lr.reset()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (``ddp_spawn`` pickles the callbacks): the weak reference to the Trainer and the
        LightningModule's ``log``/``log_dict`` that Lightning attaches to every callback are dropped."""
        state = {k: v for k, v in self.__dict__.items() if k not in _MODULE_LOGGING}
        state["_trainer_ref"] = None
        return state

    # ------------------------------------------------------------------ public API
    @property
    def posterior(self) -> SWAGPosterior:
        """The posterior collected so far (available during and after ``fit``)."""
        if self._state.posterior is None:
            raise RuntimeError(
                "SWAGCallback has no posterior yet: it is created at the first snapshot of trainer.fit. "
                "Pass the callback to L.Trainer(callbacks=[...]) and run fit (or resume from a checkpoint), "
                "and check that training reached start_epoch. After fit with a spawn-based strategy "
                "('ddp_spawn', 'ddp_notebook') the posterior stayed in the worker processes: restore it from "
                "a checkpoint, or train with strategy='ddp'."
            )
        return self._state.posterior

    @property
    def num_snapshots(self) -> int:
        """Snapshots collected so far (0 before the first one, when there is no posterior yet)."""
        return self._state.posterior.num_snapshots if self._state.posterior is not None else 0

    @property
    @override
    def state_key(self) -> str:
        return "SWAGCallback"

    # ------------------------------------------------------------------ checkpoints (callback_state.py)
    @override
    def state_dict(self) -> dict[str, Any]:
        return checkpointing.state_dict(self._state, self._swa_lr)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        shards = self._shards_statistics()
        checkpointing.read_state(state_dict, self._state, self.max_rank, shards, self._swa_lr)

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        post, key = self._state.posterior, self.state_key
        checkpointing.save_sharded_posterior(post, checkpoint, key)  # a collective

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        part = checkpointing.load_distributed_part(
            checkpoint, self.state_key, trainer.ckpt_path, pl_module, self._target_device(pl_module)
        )
        self._state.posterior = part if part is not None else self._state.posterior

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to snapshot now. Called after every optimizer step with ``step_idx`` (zero-based
        index of the last step, ``global_step - 1``) and at the end of every training epoch with
        ``epoch_idx`` (zero-based); the other argument is ``None``. This is the signature and
        convention of Lightning's ``WeightAveraging.should_update``; override it for other schedules.
        A step and an epoch end that fall together never give two snapshots of the same weights."""
        if self.every_n_steps is not None:
            return (
                step_idx is not None
                and self._current_epoch >= self.start_epoch
                and (step_idx + 1) % self.every_n_steps == 0
            )
        assert self.every_n_epochs is not None
        return (
            epoch_idx is not None
            and epoch_idx >= self.start_epoch
            and (epoch_idx - self.start_epoch) % self.every_n_epochs == 0
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer, self.shard)
        previous = self._trainer_ref() if self._trainer_ref is not None else None
        if previous is not trainer:
            # A new Trainer is a new run: a fresh posterior (a checkpoint restored after this hook
            # brings its own), and the earlier run's posterior object is left as it was.
            self._state = CollectionState()
            self._reset_run_state()
            self._trainer_ref = _reference(trainer)
        readable_checkpoint_errors(trainer.strategy)
        _warn_about_weights_only_checkpoints(trainer)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        restore_checkpoint_io(trainer.strategy)
        for name in _MODULE_LOGGING:  # bound methods of pl_module: they would keep it alive
            self.__dict__.pop(name, None)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_include_matches(pl_module, self.include, "SWAGCallback")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _is_model_parallel(trainer.strategy):
            reshard_fsdp(pl_module)  # the sanity check's forward left FSDP2's root group unsharded
        if self._state.pending is not None:  # resumed: keep this process's part of the saved posterior
            state, self._state.pending = self._state.pending, None
            self._state.posterior = SWAGPosterior.from_state_dict(
                state, device=self._target_device(pl_module), model=pl_module, shard=self.shard
            )
        swa_lr = self._swa_lr
        if swa_lr is not None and not swa_lr.installed and trainer.current_epoch >= self.start_epoch:
            swa_lr.install(trainer)  # a mid-epoch resume gets no on_train_epoch_start for its epoch
        if self._state.posterior is None:
            return  # built at the first snapshot, from the parameters trainable then
        self._state.posterior.check_compatible(pl_module)
        device = self._target_device(pl_module)
        if self._state.posterior.device != device:
            self._state.posterior.to(device)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._current_epoch = trainer.current_epoch
        swa_lr = self._swa_lr
        if swa_lr is not None and not swa_lr.installed and trainer.current_epoch >= self.start_epoch:
            swa_lr.install(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Several optimizer steps in one batch (manual optimization): the weights now are those
        # after the previous step, so a snapshot due at that step is taken here.
        self._after_steps(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._after_steps(trainer, pl_module)
        if trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self._epoch_end(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fallback for epochs that end without a recognisable last batch (e.g. ``max_steps``).
        self._epoch_end(trainer, pl_module)

    # ------------------------------------------------------------------ internals
    def _after_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Ask :meth:`should_update` about every optimizer step since the last call (one snapshot at
        most: the weights are the same for all of them)."""
        self._current_epoch = trainer.current_epoch
        step = trainer.global_step
        if step == self._state.last_step:  # no optimizer step (e.g. while accumulating gradients)
            return
        due = any(self.should_update(step_idx=index) for index in range(self._state.last_step, step))
        self._state.last_step = step
        if due:
            self._snapshot(pl_module)
            self._state.snapshot_step = step

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self._state.last_epoch:
            return
        self._state.last_epoch = epoch
        self._after_steps(trainer, pl_module)
        if self.should_update(epoch_idx=epoch) and self._state.snapshot_step != trainer.global_step:
            self._snapshot(pl_module)
            self._state.snapshot_step = trainer.global_step
        if self._swa_lr is not None and self._swa_lr.installed:
            self._swa_lr.step()

    def _target_device(self, pl_module: L.LightningModule) -> torch.device:
        return torch.device(self.device) if self.device is not None else pl_module.device

    def _shards_statistics(self) -> bool:
        """Whether this run keeps sharded statistics (ModelParallelStrategy, or DDP with ``shard``)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            return False
        return _is_model_parallel(trainer.strategy) or (self.shard and trainer.world_size > 1)

    def _new_posterior(self, pl_module: L.LightningModule) -> SWAGPosterior:
        """The posterior of the parameters trainable now (or those ``include`` selects)."""
        if _is_model_parallel(pl_module.trainer.strategy):
            plain = [n for n, p in select_parameters(pl_module, self.include) if not is_dtensor(p)]
            if plain:
                raise RuntimeError(
                    f"SWAGCallback under ModelParallelStrategy: parameter {plain[0]!r} is not sharded (a plain "
                    "Tensor). Apply torch.distributed.fsdp.fully_shard in configure_model to the module that "
                    "owns it (or to the root module), or leave it out with SWAGCallback(include=[...])."
                )
        return SWAGPosterior.from_model(
            pl_module,
            self.max_rank,
            include=self.include,
            moment_dtype=self._moment_dtype,
            deviation_dtype=self._deviation_dtype,
            device=self._target_device(pl_module),
            shard=self.shard,
        )

    def _snapshot(self, pl_module: L.LightningModule) -> None:
        if _is_model_parallel(pl_module.trainer.strategy):
            reshard_fsdp(pl_module)  # after validation FSDP2's root group is unsharded (see sharding.py)
        if self._state.posterior is None:
            self._state.posterior = self._new_posterior(pl_module)
        else:
            _warn_if_untracked_became_trainable(
                self._state.posterior, pl_module, self.include, self._warned_untracked
            )
        try:
            self._state.posterior.collect(pl_module)
        except FloatingPointError as err:
            # Diverged training: fail loudly (later snapshots would be non-finite too). The
            # posterior keeps the snapshots collected so far; say where it happened.
            trainer = pl_module._trainer
            where = f" at epoch {trainer.current_epoch}, global step {trainer.global_step}" if trainer else ""
            raise FloatingPointError(f"SWAGCallback{where}: {err}") from err


def _reference(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` (a strong one for objects that cannot be weakly referenced)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _check_strategy(trainer: L.Trainer, shard: bool) -> None:
    """Refuse the sharded strategies whose posterior would be wrong; explain the others' limits."""
    sharded = _sharded_base(trainer.strategy)
    if sharded is not None:
        name = type(trainer.strategy).__name__
        kind = name if name == sharded else f"{name} (a {sharded})"
        raise RuntimeError(
            f"SWAGCallback does not support the sharded strategy {kind}: each process holds only a shard "
            "of the weights, so the posterior would be silently wrong. Use ModelParallelStrategy with "
            "torch.distributed.fsdp.fully_shard (FSDP2) in configure_model, or strategy='ddp' with "
            "SWAGCallback(shard=True) to shard the statistics."
        )
    if shard and not _is_model_parallel(trainer.strategy) and trainer.world_size == 1:
        rank_zero_info("SWAGCallback(shard=True): a single process has nothing to shard with; it keeps all.")
    if _spawns_workers(trainer.strategy):
        rank_zero_warn(
            "SWAGCallback: this strategy trains in spawned/forked worker processes ('ddp_spawn', "
            "'ddp_notebook', ...) and Lightning sends only the weights back, not callback state, so "
            "`swag.posterior` will not be available in the launching process after fit. Keep it with "
            "a ModelCheckpoint (SWAGModule restores it: trainer.predict(..., ckpt_path=...)) or use "
            "strategy='ddp'."
        )


def _warn_about_weights_only_checkpoints(trainer: L.Trainer) -> None:
    if any(getattr(cb, "save_weights_only", False) for cb in trainer.checkpoint_callbacks):
        rank_zero_warn(
            "SWAGCallback: a ModelCheckpoint(save_weights_only=True) keeps no callback state, so its "
            "checkpoints hold no SWAG posterior (SWAGModule cannot restore one from them, and a resume starts "
            "a fresh posterior). Use save_weights_only=False, or save the posterior with "
            "swag.posterior.save(path)."
        )


def _warn_if_untracked_became_trainable(
    posterior: SWAGPosterior,
    pl_module: L.LightningModule,
    include: Sequence[str] | str | None,
    warned: set[str],
) -> None:
    """A parameter unfrozen after the first snapshot (``BackboneFinetuning``) cannot join a
    posterior whose other statistics hold more snapshots: say so, once per parameter."""
    try:
        selected = select_parameters(pl_module, include)
    except ValueError:
        return
    tracked = set(posterior.param_shapes)
    new = [name for name, _ in selected if name not in tracked and name not in warned]
    if not new:
        return
    warned.update(new)
    shown = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
    rank_zero_warn(
        f"SWAGCallback: {len(new)} parameter(s) became trainable after the first snapshot ({shown}) and are "
        "NOT in the posterior, which was built from the parameters trainable at its first snapshot: BMA "
        "keeps them at their final values. Start collecting after the last unfreezing (start_epoch), or "
        "name them in include=[...] and keep them trainable from the first snapshot on.",
        category=UserWarning,
    )
