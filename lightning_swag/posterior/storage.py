"""The stored form of a SWAG posterior: state dicts, files, the gathering of a sharded posterior and
distributed checkpoints, as plain functions.

The first functions work on :class:`~lightning_swag.posterior.statistics.SWAGStatistics` and a layout;
the last ones are ``SWAGPosterior``'s stored-form methods (``state_dict``, ``save``, ``gather``, ...),
bound to the class, using only its public members and building posteriors with
:meth:`~lightning_swag.posterior.swag.SWAGPosterior.from_statistics`: nothing here touches a
posterior's private state. The keys and checks are those of :mod:`lightning_swag.posterior.format`;
which part of the weights a process keeps is its layout (:mod:`lightning_swag.posterior.sharding`).
Plain torch.
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
    ShardedDescription,
    is_posterior_state,
    load_file,
    posterior_state_from_entries,
    read_posterior_state,
    read_sharded_description,
    sharded_statistic_key,
)
from lightning_swag.posterior.format import (
    sharded_description as describe_sharded,
)
from lightning_swag.posterior.parameters import canonical_name, named_tracked
from lightning_swag.posterior.sharding import (
    FSDP2Layout,
    Layout,
    WholeLayout,
    gather_columns,
    layout_for,
    load_checkpoint_views,
    reshard_fsdp,
)
from lightning_swag.posterior.statistics import SWAGStatistics

if TYPE_CHECKING:
    from lightning_swag.posterior.swag import SWAGPosterior

__all__ = [
    "assign_state",
    "checkpoint_views",
    "from_distributed_checkpoint",
    "from_sharded_entries",
    "from_state_dict",
    "gather",
    "gather_statistics",
    "load",
    "load_state_dict",
    "read_checkpoint_statistics",
    "read_file_state",
    "refuse_sharded_state",
    "save",
    "sharded_description",
    "sharded_like",
    "sharded_state_dict",
    "state_dict",
    "state_layout",
    "statistics_like",
    "statistics_of",
]


def statistics_like(
    num_local: int, max_rank: int, moment_dtype: torch.dtype, deviation_dtype: torch.dtype, device: Any
) -> SWAGStatistics:
    """Empty statistics of ``num_local`` columns."""
    return SWAGStatistics(num_local, max_rank, moment_dtype, deviation_dtype, torch.device(device))


def assign_state(
    stats: SWAGStatistics,
    layout: Layout,
    param_shapes: Mapping[str, torch.Size],
    saved: PosteriorState,
) -> None:
    """Fill ``stats`` with this process's columns of a checked state of the same parameters.

    Raises:
        ValueError: the state is another posterior's (other parameters or ``max_rank``).
    """
    shapes = {canonical_name(n): s for n, s in saved.param_shapes.items()}
    if shapes != dict(param_shapes) or saved.max_rank != stats.max_rank:
        raise ValueError(
            "Saved SWAG state does not match this posterior "
            f"(saved {len(shapes)} tensors, max_rank={saved.max_rank}; "
            f"here {len(param_shapes)} tensors, max_rank={stats.max_rank}). "
            "Build the posterior with SWAGPosterior.from_state_dict instead."
        )
    take = layout.take
    stats.assign(take(saved.mean), take(saved.sum_sq_dev), take(saved.deviations), saved.num_snapshots)


def refuse_sharded_state(layout: Layout) -> None:
    """A ``ValueError`` saying how to store a posterior that keeps only a part of the weights."""
    if layout.is_sharded:
        raise ValueError(
            f"This posterior is sharded ({layout.describe()} on this process), and a state dict "
            "holds whole statistics: join the parts with gather() (a collective) and take its state_dict(), "
            "or use save(path) / sharded_state_dict(prefix)."
        )


def statistics_of(saved: PosteriorState, layout: Layout, device: torch.device | str | None) -> SWAGStatistics:
    """This process's columns (those of ``layout``) of a checked state, as new statistics on ``device``
    (default: where the state's tensors are)."""
    stats = statistics_like(
        layout.num_local,
        saved.max_rank,
        saved.mean.dtype,
        saved.deviations.dtype,
        device if device is not None else saved.mean.device,
    )
    assign_state(stats, layout, layout.shapes, saved)
    return stats


def state_layout(saved: PosteriorState, model: nn.Module | None, shard: bool) -> Layout:
    """The layout ``SWAGPosterior.from_model`` would give ``model``'s parameters of a saved state
    (without a model: the whole vector)."""
    if model is None:
        return WholeLayout({canonical_name(n): s for n, s in saved.param_shapes.items()})
    named = named_tracked(model)
    names = [canonical_name(n) for n in saved.param_shapes]
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"The model has no parameters {missing[:5]} that the saved posterior tracks.")
    return layout_for([(n, named[n]) for n in names], shard)


def read_file_state(path: str | os.PathLike[str]) -> Any:
    """The posterior state stored in a file written by ``SWAGPosterior.save`` (weights only).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is damaged, needs unpickling or holds no SWAG posterior.
    """
    state = load_file(path, "SWAG posterior file")
    if not is_posterior_state(state):
        keys = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{str(path)!r} is a torch file but not a SWAG posterior (found {keys}); write one with "
            "SWAGPosterior.save, or read a training checkpoint with SWAGModule/trainer.predict(ckpt_path=...)."
        )
    return state


def gather_statistics(stats: SWAGStatistics, layout: Layout, dst: int) -> SWAGStatistics | None:
    """The whole statistics (on the CPU) on global rank ``dst`` from every process's part, ``None`` on
    the other processes. A collective; the statistics travel row by row, so besides the result
    ``dst`` holds one padded row per process at a time."""
    whole = None
    if dist.get_rank() == dst:
        whole = statistics_like(
            layout.num_params, stats.max_rank, stats.mean.dtype, stats.deviations.dtype, "cpu"
        )
    for name in STATISTIC_NAMES:
        mine = getattr(stats, name)
        target = getattr(whole, name) if whole is not None else None
        rows = (
            (mine, target)
            if mine.dim() == 2
            else (mine.unsqueeze(0), None if target is None else target.unsqueeze(0))
        )
        for row in range(rows[0].shape[0]):  # one row at a time bounds the memory on dst
            out = None if rows[1] is None else rows[1][row : row + 1]
            gather_columns(rows[0][row : row + 1], layout, dst, out=out)
    if whole is not None:
        whole.num_snapshots = stats.num_snapshots
    return whole


def checkpoint_views(stats: SWAGStatistics, layout: Layout, prefix: str) -> dict[str, Tensor]:
    """Per-parameter DTensor views of the statistics of an FSDP2 posterior, keyed
    ``<prefix><statistic>/<name>`` (see ``SWAGPosterior.sharded_state_dict``)."""
    buffers = {name: getattr(stats, name) for name in STATISTIC_NAMES}
    views = layout.checkpoint_views(buffers, lambda stat, name: sharded_statistic_key(prefix, stat, name))
    if views is None:
        raise ValueError("sharded_state_dict is for posteriors of FSDP2 (fully_shard) parameters.")
    return views


def read_checkpoint_statistics(
    checkpoint: str | os.PathLike[str],
    description: Mapping[str, Any],
    model: nn.Module,
    device: torch.device | str | None,
) -> tuple[ShardedDescription, SWAGStatistics, FSDP2Layout]:
    """This process's part of the statistics stored per process in the distributed checkpoint folder
    ``checkpoint`` for the FSDP2-sharded ``model`` (a collective: each process reads its own shards),
    with their description and layout."""
    reshard_fsdp(model)
    named = named_tracked(model)
    saved = read_sharded_description(description)
    names = list(saved.param_shapes)
    layout = FSDP2Layout.of_parameters([(n, named[n]) for n in names])
    stats = statistics_like(
        layout.num_local,
        saved.max_rank,
        saved.moment_dtype,
        saved.deviation_dtype,
        device if device is not None else named[names[0]].device,
    )
    load_checkpoint_views(checkpoint_views(stats, layout, saved.prefix), checkpoint)
    stats.num_snapshots = saved.num_snapshots
    return saved, stats, layout


# ---------------------------------------------------------------------- SWAGPosterior's stored form
def state_dict(post: SWAGPosterior) -> dict[str, Any]:
    """Everything needed to rebuild this posterior (see :mod:`lightning_swag.posterior.format`);
    tensors are stored as they live.

    Raises:
        ValueError: the posterior is sharded (use :meth:`~lightning_swag.posterior.swag.SWAGPosterior.gather`, :meth:`~lightning_swag.posterior.swag.SWAGPosterior.save` or
            :meth:`~lightning_swag.posterior.swag.SWAGPosterior.sharded_state_dict`).
    """
    refuse_sharded_state(post.layout)
    stats = post.statistics
    return PosteriorState(
        post.param_shapes, post.max_rank, stats.num_snapshots, stats.mean, stats.sum_sq_dev, stats.deviations
    ).to_dict()


def load_state_dict(
    post: SWAGPosterior, state: Mapping[str, Any], source: str | os.PathLike[str] | None = None
) -> None:
    """Restore statistics saved by :meth:`~lightning_swag.posterior.swag.SWAGPosterior.state_dict` into this (same-shaped) posterior; a sharded
    posterior keeps its part of them. The state is checked first (shapes, counts, finiteness).

    Raises:
        ValueError: the state is damaged (naming the field, and ``source`` when given), or it is
            another posterior's.
    """
    assign_state(post.statistics, post.layout, post.param_shapes, read_posterior_state(state, source))


def from_state_dict(
    cls: type[SWAGPosterior],
    state: Mapping[str, Any],
    device: torch.device | str | None = None,
    *,
    model: nn.Module | None = None,
    shard: bool = False,
    source: str | os.PathLike[str] | None = None,
) -> SWAGPosterior:
    """Build a posterior from :meth:`~lightning_swag.posterior.swag.SWAGPosterior.state_dict` output (dtypes preserved; the state is checked).

    With ``model``, the posterior is sharded as :meth:`~lightning_swag.posterior.swag.SWAGPosterior.from_model` would shard it for that model's
    parameters (FSDP2 shards, or a DDP slice with ``shard=True``) and keeps only this process's
    part of ``state``. ``source`` names the file or checkpoint in errors.
    """
    saved = read_posterior_state(state, source)
    layout = state_layout(saved, model, shard)
    return cls.from_statistics(saved.param_shapes, statistics_of(saved, layout, device), layout)


def sharded_like(post: SWAGPosterior, model: nn.Module) -> SWAGPosterior:
    """This posterior, or (for an unsharded posterior and an FSDP2-sharded ``model``) a posterior
    keeping this process's part of it, sharded like ``model``'s parameters."""
    if post.is_sharded or post.layout.fits(model):
        return post
    return type(post).from_state_dict(post.state_dict(), device=post.device, model=model)


def save(post: SWAGPosterior, path: str | os.PathLike[str]) -> None:
    """Write the posterior to ``path`` with ``torch.save`` (tensors moved to CPU).

    A sharded posterior must call it on every process (a collective): the parts are gathered to
    global rank 0, which writes the unsharded posterior (it then holds it all in host memory).
    """
    whole = post.gather(dst=0)
    if whole is not None:
        torch.save({k: v.cpu() if isinstance(v, Tensor) else v for k, v in whole.state_dict().items()}, path)
    if post.is_sharded:
        dist.barrier()


def load(
    cls: type[SWAGPosterior], path: str | os.PathLike[str], device: torch.device | str | None = "cpu"
) -> SWAGPosterior:
    """Read a posterior written by :meth:`~lightning_swag.posterior.swag.SWAGPosterior.save` (weights only: nothing in the file is unpickled).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is damaged, needs unpickling, holds no SWAG posterior, or its
            statistics fail the checks (naming the file and the field).
    """
    return cls.from_state_dict(read_file_state(path), device=device, source=path)


def gather(post: SWAGPosterior, dst: int = 0) -> SWAGPosterior | None:
    """The unsharded posterior (on the CPU) on global rank ``dst``, ``None`` on the other processes.

    A collective: every process must call it (see :func:`gather_statistics`).
    An unsharded posterior returns itself.
    """
    if not post.is_sharded:
        return post
    whole = gather_statistics(post.statistics, post.layout, dst)
    return None if whole is None else type(post).from_statistics(post.param_shapes, whole)


def sharded_state_dict(post: SWAGPosterior, prefix: str) -> dict[str, Tensor]:
    """Per-parameter DTensor views of this process's statistics (FSDP2 posteriors), keyed
    ``<prefix><statistic>/<name>``, for ``torch.distributed.checkpoint``: saving writes every
    process's shards, loading fills this posterior in place (see :mod:`lightning_swag.posterior.format`)."""
    return checkpoint_views(post.statistics, post.layout, prefix)


def sharded_description(post: SWAGPosterior, prefix: str) -> dict[str, Any]:
    """Everything but the tensors of :meth:`~lightning_swag.posterior.swag.SWAGPosterior.sharded_state_dict`: what is needed to rebuild the
    posterior from them (plain Python values, stored in the callback state)."""
    return describe_sharded(
        prefix, post.param_shapes, post.max_rank, post.num_snapshots, post.moment_dtype, post.deviation_dtype
    )


def from_distributed_checkpoint(
    cls: type[SWAGPosterior],
    checkpoint: str | os.PathLike[str],
    description: Mapping[str, Any],
    model: nn.Module,
    device: torch.device | str | None = None,
) -> SWAGPosterior:
    """This process's part of a posterior stored by :meth:`~lightning_swag.posterior.swag.SWAGPosterior.sharded_state_dict` in the distributed
    checkpoint folder ``checkpoint``, for the FSDP2-sharded ``model`` (a collective: each process
    reads its own shards)."""
    saved, stats, layout = read_checkpoint_statistics(checkpoint, description, model, device)
    return cls.from_statistics(saved.param_shapes, stats, layout)


def from_sharded_entries(
    cls: type[SWAGPosterior], description: Mapping[str, Any], entries: Mapping[str, Tensor]
) -> SWAGPosterior:
    """The unsharded posterior from whole per-parameter statistics, e.g. the ``_swag/`` entries of a
    distributed checkpoint consolidated with ``torch.distributed.checkpoint.format_utils``."""
    return cls.from_state_dict(posterior_state_from_entries(description, entries))
