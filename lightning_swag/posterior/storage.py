"""Saving, loading and gathering a posterior: state dicts, files and distributed checkpoints.

:class:`PosteriorStorage` is the part of :class:`~lightning_swag.SWAGPosterior` that turns its
statistics into stored form and back, through the format of :mod:`lightning_swag.posterior.format` (every
key and check lives there) and the layout of :mod:`lightning_swag.posterior.sharding` (which part of the
weights each process writes). Plain torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_swag.posterior.format import (
    STATISTIC_NAMES,
    PosteriorState,
    is_posterior_state,
    load_file,
    posterior_state_from_entries,
    read_posterior_state,
    read_sharded_description,
    sharded_description,
    sharded_statistic_key,
)
from lightning_swag.posterior.parameters import canonical_name, named_tracked
from lightning_swag.posterior.sharding import (
    FSDP2Layout,
    gather_columns,
    layout_for,
    load_checkpoint_views,
    reshard_fsdp,
)

if TYPE_CHECKING:
    from lightning_swag.posterior.sharding import Layout
    from lightning_swag.posterior.statistics import SWAGStatistics
    from lightning_swag.posterior.swag import SWAGPosterior

__all__ = ["PosteriorStorage"]


class PosteriorStorage:
    """State dicts, files and the collectives that join a sharded posterior (see the module docstring)."""

    param_shapes: dict[str, torch.Size]
    max_rank: int
    _layout: Layout
    _stats: SWAGStatistics

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this posterior (see :mod:`lightning_swag.posterior.format`); tensors
        are stored as they live.

        Raises:
            ValueError: the posterior is sharded (use :meth:`gather`, :meth:`save` or
                :meth:`sharded_state_dict`).
        """
        if self.is_sharded:
            raise ValueError(
                f"This posterior is sharded ({self._layout.describe()} on this process), and a state dict "
                "holds whole statistics: join the parts with gather() (a collective) and take its state_dict(), "
                "or use save(path) / sharded_state_dict(prefix)."
            )
        stats = self._stats
        return PosteriorState(
            self.param_shapes,
            self.max_rank,
            stats.num_snapshots,
            stats.mean,
            stats.sum_sq_dev,
            stats.deviations,
        ).to_dict()

    def load_state_dict(self, state: Mapping[str, Any], source: str | os.PathLike[str] | None = None) -> None:
        """Restore statistics saved by :meth:`state_dict` into this (same-shaped) posterior; a sharded
        posterior keeps its part of them. The state is checked first (shapes, counts, finiteness).

        Raises:
            ValueError: the state is damaged (naming the field, and ``source`` when given), or it is
                another posterior's.
        """
        saved = read_posterior_state(state, source)
        shapes = {canonical_name(n): s for n, s in saved.param_shapes.items()}
        if shapes != self.param_shapes or saved.max_rank != self.max_rank:
            raise ValueError(
                "Saved SWAG state does not match this posterior "
                f"(saved {len(shapes)} tensors, max_rank={saved.max_rank}; "
                f"here {len(self.param_shapes)} tensors, max_rank={self.max_rank}). "
                "Build the posterior with SWAGPosterior.from_state_dict instead."
            )
        take = self._layout.take
        self._stats.assign(
            take(saved.mean), take(saved.sum_sq_dev), take(saved.deviations), saved.num_snapshots
        )

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        device: torch.device | str | None = None,
        *,
        model: nn.Module | None = None,
        shard: bool = False,
        source: str | os.PathLike[str] | None = None,
    ) -> SWAGPosterior:
        """Build a posterior from :meth:`state_dict` output (dtypes preserved; the state is checked).

        With ``model``, the posterior is sharded as :meth:`from_model` would shard it for that model's
        parameters (FSDP2 shards, or a DDP slice with ``shard=True``) and keeps only this process's
        part of ``state``. ``source`` names the file or checkpoint in errors.
        """
        saved = read_posterior_state(state, source)
        layout = None
        if model is not None:
            named = named_tracked(model)
            names = [canonical_name(n) for n in saved.param_shapes]
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(
                    f"The model has no parameters {missing[:5]} that the saved posterior tracks."
                )
            layout = layout_for([(n, named[n]) for n in names], shard)
        post = cls(
            saved.param_shapes,
            saved.max_rank,
            moment_dtype=saved.mean.dtype,
            deviation_dtype=saved.deviations.dtype,
            device=device if device is not None else saved.mean.device,
            layout=layout,
        )
        post.load_state_dict(saved.to_dict(), source)
        return post

    def sharded_like(self, model: nn.Module) -> SWAGPosterior:
        """This posterior, or (for an unsharded posterior and an FSDP2-sharded ``model``) a posterior
        keeping this process's part of it, sharded like ``model``'s parameters."""
        if self.is_sharded or self._layout.fits(model):
            return self
        return type(self).from_state_dict(self.state_dict(), device=self.device, model=model)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the posterior to ``path`` with ``torch.save`` (tensors moved to CPU).

        A sharded posterior must call it on every process (a collective): the parts are gathered to
        global rank 0, which writes the unsharded posterior (it then holds it all in host memory).
        """
        if self.is_sharded:
            whole = self.gather(dst=0)
            if whole is not None:
                whole.save(path)
            dist.barrier()
            return
        torch.save({k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.state_dict().items()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str | None = "cpu") -> SWAGPosterior:
        """Read a posterior written by :meth:`save` (weights only: nothing in the file is unpickled).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is damaged, needs unpickling, holds no SWAG posterior, or its
                statistics fail the checks (naming the file and the field).
        """
        state = load_file(path, "SWAG posterior file")
        if not is_posterior_state(state):
            keys = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"{str(path)!r} is a torch file but not a SWAG posterior (found {keys}); write one with "
                "SWAGPosterior.save, or read a training checkpoint with SWAGModule/trainer.predict(ckpt_path=...)."
            )
        return cls.from_state_dict(state, device=device, source=path)

    # ------------------------------------------------------------------ sharded posteriors
    def gather(self, dst: int = 0) -> SWAGPosterior | None:
        """The unsharded posterior (on the CPU) on global rank ``dst``, ``None`` on the other processes.

        A collective: every process must call it. The statistics travel row by row, so besides the
        result ``dst`` holds one padded row per process at a time. An unsharded posterior returns
        itself.
        """
        if not self.is_sharded:
            return self
        whole = None
        if dist.get_rank() == dst:
            whole = type(self)(
                self.param_shapes, self.max_rank, moment_dtype=self.moment_dtype,
                deviation_dtype=self.deviation_dtype, device="cpu",
            )  # fmt: skip
        for name in STATISTIC_NAMES:
            mine = getattr(self._stats, name)
            target = getattr(whole._stats, name) if whole is not None else None
            rows = (
                (mine, target)
                if mine.dim() == 2
                else (mine.unsqueeze(0), None if target is None else target.unsqueeze(0))
            )
            for row in range(rows[0].shape[0]):  # one row at a time bounds the memory on dst
                out = None if rows[1] is None else rows[1][row : row + 1]
                gather_columns(rows[0][row : row + 1], self._layout, dst, out=out)
        if whole is not None:
            whole._stats.num_snapshots = self.num_snapshots
        return whole

    def sharded_state_dict(self, prefix: str) -> dict[str, Tensor]:
        """Per-parameter DTensor views of this process's statistics (FSDP2 posteriors), keyed
        ``<prefix><statistic>/<name>``, for ``torch.distributed.checkpoint``: saving writes every
        process's shards, loading fills this posterior in place (see :mod:`lightning_swag.posterior.format`)."""
        buffers = {name: getattr(self._stats, name) for name in STATISTIC_NAMES}
        views = self._layout.checkpoint_views(
            buffers, lambda stat, name: sharded_statistic_key(prefix, stat, name)
        )
        if views is None:
            raise ValueError("sharded_state_dict is for posteriors of FSDP2 (fully_shard) parameters.")
        return views

    def sharded_description(self, prefix: str) -> dict[str, Any]:
        """Everything but the tensors of :meth:`sharded_state_dict`: what is needed to rebuild the
        posterior from them (plain Python values, stored in the callback state)."""
        return sharded_description(
            prefix,
            self.param_shapes,
            self.max_rank,
            self.num_snapshots,
            self.moment_dtype,
            self.deviation_dtype,
        )

    @classmethod
    def from_distributed_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str],
        description: Mapping[str, Any],
        model: nn.Module,
        device: torch.device | str | None = None,
    ) -> SWAGPosterior:
        """This process's part of a posterior stored by :meth:`sharded_state_dict` in the distributed
        checkpoint folder ``checkpoint``, for the FSDP2-sharded ``model`` (a collective: each process
        reads its own shards)."""
        reshard_fsdp(model)
        named = named_tracked(model)
        saved = read_sharded_description(description)
        names = list(saved.param_shapes)
        layout = FSDP2Layout.of_parameters([(n, named[n]) for n in names])
        post = cls(
            saved.param_shapes,
            saved.max_rank,
            moment_dtype=saved.moment_dtype,
            deviation_dtype=saved.deviation_dtype,
            device=device if device is not None else named[names[0]].device,
            layout=layout,
        )
        load_checkpoint_views(post.sharded_state_dict(saved.prefix), checkpoint)
        post._stats.num_snapshots = saved.num_snapshots
        return post

    @classmethod
    def from_sharded_entries(
        cls, description: Mapping[str, Any], entries: Mapping[str, Tensor]
    ) -> SWAGPosterior:
        """The unsharded posterior from whole per-parameter statistics, e.g. the ``_swag/`` entries of a
        distributed checkpoint consolidated with ``torch.distributed.checkpoint.format_utils``."""
        return cls.from_state_dict(posterior_state_from_entries(description, entries))
