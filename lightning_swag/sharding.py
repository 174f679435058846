"""Sharded SWAG statistics: which part of the flat weight vector a process keeps, and the collectives
that join the parts. Plain torch (``torch.distributed``); nothing here imports Lightning.

A posterior's statistics are kept for the flat vector of its tracked parameters, concatenated in
parameter order (the *global* vector of ``P`` weights). A sharded posterior keeps, on every
process, only a *local* vector: the concatenation of some pieces of the global one. A
:class:`ShardLayout` lists them:

* ``"ddp"`` (``SWAGCallback(shard=True)`` under DDP, where every process holds the whole model):
  process ``r`` of ``W`` keeps the contiguous slice ``[r·c, min(P, (r+1)·c))`` with ``c = ⌈P/W⌉``
  (``torch.chunk`` semantics on the flat vector), which may cut parameters;
* ``"fsdp2"`` (``torch.distributed.fsdp.fully_shard`` on a 1-D mesh, placement ``Shard(0)``): every
  process keeps its own rows of every parameter (``param.to_local()``, ``torch.chunk`` semantics on
  dim 0, so shards may be uneven or empty).

Everything elementwise (Welford moments, deviation columns, the diagonal noise of a column) works
on the local vector unchanged. Joining the parts (one file, checkpoints, DDP prediction) goes through
:func:`gather_columns` and :func:`all_gather_columns`, one code path for both layouts. For FSDP2
distributed checkpoints, :func:`dtensor_views` wraps the local statistics of each parameter in a
``DTensor`` with the parameter's mesh and placements, which ``torch.distributed.checkpoint`` saves
and loads per process, in place.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_swag.checkpoint import sharded_statistic_key

__all__ = [
    "Piece",
    "ShardLayout",
    "all_gather_columns",
    "chunk_rows",
    "dtensor_views",
    "gather_columns",
    "has_dtensor_parameters",
    "is_dtensor",
    "load_dtensor_views",
    "reshard_fsdp",
]

LayoutKind = Literal["ddp", "fsdp2"]
Span = tuple[int, int, int]  # (local start, global start, count)


@functools.cache
def _dtensor_class() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def has_dtensor_parameters(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (the module was sharded with ``fully_shard``)."""
    return any(is_dtensor(p) for p in module.parameters())


def reshard_fsdp(module: nn.Module) -> None:
    """Put every FSDP2 module of ``module`` back into its sharded state (a no-op for other modules).

    FSDP2 keeps the *root* group's parameters unsharded after a forward pass, expecting a backward
    next. After a forward without one (Lightning's sanity check, validation, prediction) the root's
    parameters are then plain tensors in ``named_parameters()``, and in-place writes into the sharded
    DTensors are not seen by the next forward. ``reshard()`` fixes both; it is public API.
    """
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def chunk_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(first row, number of rows)`` of part ``rank`` when ``rows`` rows are cut into ``world_size``
    parts with ``torch.chunk`` semantics (parts of ``⌈rows/W⌉``, the last ones short or empty): the
    rows FSDP2 gives a process, and the columns of a DDP slice."""
    size = -(-rows // world_size) if rows else 0
    first = min(rank * size, rows)
    return first, max(0, min(size, rows - first))


@dataclass(frozen=True)
class Piece:
    """Local elements ``[local, local + count)`` are global flat elements ``[start, start + count)``,
    i.e. elements ``[within, within + count)`` of parameter ``name`` flattened.

    ``local_shape`` is the shape of the piece as a tensor (FSDP2: the local shard's shape; ``None``
    when the piece cuts a parameter's rows, as DDP slices do)."""

    name: str
    start: int
    local: int
    within: int
    count: int
    local_shape: tuple[int, ...] | None = None


class ShardLayout:
    """The pieces of the global flat weight vector that this process keeps (see the module docstring).

    Build one with :meth:`ddp_slice` or :meth:`fsdp2`; ``SWAGPosterior.from_model(..., shard=True)``
    picks the right one.

    Args:
        shapes: ordered ``{canonical name: global shape}`` of the tracked parameters.
        pieces: the pieces, in local order.
        kind: ``"ddp"`` or ``"fsdp2"``.
        placements: FSDP2 only: ``{name: (device mesh, placements)}`` of every parameter, for
            :func:`dtensor_views`.
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        pieces: Sequence[Piece],
        kind: LayoutKind,
        placements: Mapping[str, tuple[Any, tuple[Any, ...]]] | None = None,
    ) -> None:
        if kind not in ("ddp", "fsdp2"):
            raise ValueError(f"kind must be 'ddp' or 'fsdp2', got {kind!r}.")
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.pieces = list(pieces)
        self.kind: LayoutKind = kind
        self.placements = dict(placements or {})
        self.num_params = sum(math.prod(s) for s in self.shapes.values())
        self.num_local = sum(piece.count for piece in self.pieces)
        self._all_spans: list[list[Span]] | None = None
        local = 0
        for piece in self.pieces:
            if piece.local != local or piece.name not in self.shapes:
                raise ValueError(f"Invalid layout: piece {piece} does not follow the previous one.")
            local += piece.count

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _offsets(shapes: Mapping[str, torch.Size]) -> dict[str, int]:
        offsets, total = {}, 0
        for name, shape in shapes.items():
            offsets[name] = total
            total += math.prod(shape)
        return offsets

    @classmethod
    def ddp_slice(cls, shapes: Mapping[str, Sequence[int]], world_size: int, rank: int) -> ShardLayout:
        """Slice ``rank`` of ``world_size`` of the flat vector (``torch.chunk`` semantics)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
        sizes = {name: torch.Size(shape) for name, shape in shapes.items()}
        offsets = cls._offsets(sizes)
        total = sum(math.prod(s) for s in sizes.values())
        first, count = chunk_rows(total, world_size, rank)
        pieces, local = [], 0
        for name, shape in sizes.items():
            begin = max(first, offsets[name])
            end = min(first + count, offsets[name] + math.prod(shape))
            if end > begin:
                pieces.append(Piece(name, begin, local, begin - offsets[name], end - begin))
                local += end - begin
        return cls(sizes, pieces, "ddp")

    @classmethod
    def from_row_shards(
        cls,
        shapes: Mapping[str, Sequence[int]],
        rows: Mapping[str, tuple[int, int]],
        placements: Mapping[str, tuple[Any, tuple[Any, ...]]] | None = None,
    ) -> ShardLayout:
        """The FSDP2 layout from ``{name: (first row, number of rows)}`` of every parameter's local
        shard (dim 0). Every parameter gets a piece, empty ones included, so that every process
        offers the same checkpoint keys."""
        sizes = {name: torch.Size(shape) for name, shape in shapes.items()}
        offsets = cls._offsets(sizes)
        pieces, local = [], 0
        for name, shape in sizes.items():
            first, count_rows = rows[name]
            row_numel = math.prod(shape[1:])
            count = count_rows * row_numel
            local_shape = (count_rows, *shape[1:])
            within = first * row_numel
            pieces.append(Piece(name, offsets[name] + within, local, within, count, local_shape))
            local += count
        return cls(sizes, pieces, "fsdp2", placements)

    @classmethod
    def fsdp2(cls, named: Sequence[tuple[str, Tensor]]) -> ShardLayout:
        """The layout of parameters sharded by ``fully_shard``: each must be a DTensor on a 1-D device
        mesh that spans all processes, with placement ``Shard(0)``.

        The local rows are computed with ``torch.chunk`` semantics and checked against
        ``to_local()`` (no private API).

        Raises:
            ValueError: a parameter is a plain tensor, or sharded another way (tensor parallelism,
                HSDP, ``shard_placement_fn``), naming it and saying what is supported.
        """
        from torch.distributed.tensor import DTensor, Shard

        shapes, rows, placements = {}, {}, {}
        for name, param in named:
            if not isinstance(param, DTensor):
                raise ValueError(
                    f"Parameter {name!r} is not sharded (a plain {type(param).__name__}) while others are "
                    "DTensors: apply torch.distributed.fsdp.fully_shard to the module that owns it (or to the "
                    "root module in configure_model), or leave it out of the posterior with include=[...]."
                )
            mesh = param.device_mesh
            if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
                raise ValueError(
                    f"Parameter {name!r} has placements {tuple(param.placements)} on a {mesh.ndim}-D device "
                    "mesh; sharded SWAG supports FSDP2's Shard(0) over one data-parallel mesh dimension "
                    "(ModelParallelStrategy(tensor_parallel_size=1), fully_shard without shard_placement_fn)."
                )
            if dist.is_initialized() and mesh.size() != dist.get_world_size():
                raise ValueError(
                    f"Parameter {name!r} is sharded over {mesh.size()} of {dist.get_world_size()} processes; "
                    "sharded SWAG needs the FSDP2 mesh to span all processes (pure data parallelism)."
                )
            shape = param.shape
            if len(shape) == 0:
                raise ValueError(
                    f"Parameter {name!r} is a 0-dim DTensor; FSDP2 shards dim 0 of each parameter."
                )
            first, count = chunk_rows(shape[0], mesh.size(), mesh.get_local_rank())
            local_shape = tuple(param.to_local().shape)
            if local_shape != (count, *shape[1:]):
                raise ValueError(
                    f"Parameter {name!r}: the local shard has shape {local_shape}, but torch.chunk semantics "
                    f"on dim 0 give {(count, *shape[1:])} for process {mesh.get_local_rank()} of {mesh.size()}; "
                    "this FSDP2 sharding is not supported."
                )
            shapes[name], rows[name], placements[name] = (
                shape,
                (first, count),
                (mesh, tuple(param.placements)),
            )
        return cls.from_row_shards(shapes, rows, placements)

    @classmethod
    def for_parameters(cls, named: Sequence[tuple[str, Tensor]], shard: bool) -> ShardLayout | None:
        """The layout for these parameters: FSDP2 when any is a DTensor; a DDP slice when ``shard`` and
        more than one process runs; otherwise ``None`` (unsharded)."""
        if any(is_dtensor(p) for _, p in named):
            return cls.fsdp2(named)
        if shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls.ddp_slice({n: p.shape for n, p in named}, dist.get_world_size(), dist.get_rank())
        return None

    # ------------------------------------------------------------------ views
    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The global ``[start, end)`` ranges of the pieces, in local order."""
        return [(p.start, p.start + p.count) for p in self.pieces]

    @property
    def spans(self) -> list[Span]:
        """``(local start, global start, count)`` runs that are contiguous both locally and globally
        (a DDP slice is one run), without empty ones."""
        spans: list[list[int]] = []
        for p in self.pieces:
            if p.count == 0:
                continue
            if spans and spans[-1][0] + spans[-1][2] == p.local and spans[-1][1] + spans[-1][2] == p.start:
                spans[-1][2] += p.count
            else:
                spans.append([p.local, p.start, p.count])
        return [(a, b, c) for a, b, c in spans]

    def sources(self, named: Mapping[str, Tensor]) -> list[Tensor]:
        """The flat tensors holding each piece's values in ``named`` (views where possible): a
        DTensor gives its local shard, a plain (whole) tensor the piece's elements."""
        out = []
        for piece in self.pieces:
            tensor = named[piece.name].detach()
            if is_dtensor(tensor):
                out.append(tensor.to_local().reshape(-1))
            else:
                out.append(tensor.reshape(-1)[piece.within : piece.within + piece.count])
        return out

    def take(self, flat: Tensor) -> Tensor:
        """The local part ``[..., num_local]`` of a global ``[..., P]`` tensor (a copy)."""
        if flat.shape[-1] != self.num_params:
            raise ValueError(f"Expected a last dimension of {self.num_params}, got {tuple(flat.shape)}.")
        out = flat.new_empty(*flat.shape[:-1], self.num_local)
        for local, start, count in self.spans:
            out[..., local : local + count] = flat[..., start : start + count]
        return out

    def describe(self) -> str:
        """A short description for messages, e.g. ``"ddp slice of 626/1251 weights"``."""
        what = "ddp slice" if self.kind == "ddp" else "fsdp2 shards"
        return f"{what} of {self.num_local}/{self.num_params} weights"

    def all_spans(self) -> list[list[Span]]:
        """The spans of every process (a collective the first time, then cached). Checks that the
        processes' pieces cover the global vector exactly once."""
        if self._all_spans is None:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.spans)
            covered = sorted((start, count) for spans in gathered for _, start, count in spans)
            position = 0
            for start, count in covered:
                if start != position:
                    break
                position += count
            if position != self.num_params or sum(c for _, c in covered) != self.num_params:
                raise RuntimeError(
                    "The processes' sharded posteriors do not cover the tracked weights exactly once; every "
                    "process must build its posterior the same way (same model, include and shard settings)."
                )
            self._all_spans = [[tuple(span) for span in spans] for spans in gathered]  # type: ignore[misc]
        return self._all_spans


# ---------------------------------------------------------------------- collectives
def _comm_device(device: torch.device) -> torch.device:
    """Where tensors must be for the default process group: the current CUDA device for NCCL, the CPU
    otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _padded(local: Tensor, width: int) -> Tensor:
    padded = torch.zeros(local.shape[0], max(width, 1), dtype=local.dtype, device=_comm_device(local.device))
    padded[:, : local.shape[1]].copy_(local)
    return padded


def gather_columns(
    local: Tensor, layout: ShardLayout, dst: int = 0, out: Tensor | None = None
) -> Tensor | None:
    """Join the ``[R, num_local]`` matrices of every process into one ``[R, P]`` on process ``dst``,
    placing each process's columns by its pieces. A collective; returns ``None`` off ``dst``.

    ``out`` (on ``dst``) receives the result; by default a new CPU tensor. Extra memory on ``dst``:
    ``W`` padded local matrices, so call it row by row for big ones.
    """
    all_spans = layout.all_spans()
    width = max(sum(count for _, _, count in spans) for spans in all_spans)
    padded = _padded(local, width)
    on_dst = dist.get_rank() == dst
    bucket = [torch.empty_like(padded) for _ in all_spans] if on_dst else None
    dist.gather(padded, bucket, dst=dst)
    if not on_dst:
        return None
    assert bucket is not None
    if out is None:
        out = torch.empty(local.shape[0], layout.num_params, dtype=local.dtype)
    for part, spans in zip(bucket, all_spans, strict=True):
        for loc, start, count in spans:
            out[:, start : start + count].copy_(part[:, loc : loc + count])
    return out


def all_gather_columns(local: Tensor, layout: ShardLayout) -> Tensor:
    """Join the ``[R, num_local]`` matrices of every process into ``[R, P]`` on every process (on
    ``local``'s device). A collective; used to give every DDP process whole weight samples."""
    all_spans = layout.all_spans()
    width = max(sum(count for _, _, count in spans) for spans in all_spans)
    padded = _padded(local, width)
    rows = local.shape[0]
    # one [W·R, width] buffer: gloo accepts the output concatenated along dim 0, not stacked
    buffer = padded.new_empty(len(all_spans) * rows, padded.shape[1])
    dist.all_gather_into_tensor(buffer, padded)
    out = torch.empty(rows, layout.num_params, dtype=local.dtype, device=local.device)
    for r, spans in enumerate(all_spans):
        part = buffer[r * rows : (r + 1) * rows]
        for loc, start, count in spans:
            out[:, start : start + count].copy_(part[:, loc : loc + count])
    return out


# ---------------------------------------------------------------------- FSDP2 distributed checkpoints
def dtensor_views(layout: ShardLayout, statistics: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Per-parameter DTensors over *views* of this process's statistics, with the parameters' device
    mesh and placements, keyed ``sharded_statistic_key(prefix, statistic, name)``.

    ``statistics`` maps a statistic name to its local buffer: ``[num_local]`` vectors (a DTensor of the
    parameter's shape) or ``[K, num_local]`` matrices (a ``[K, *shape]`` DTensor sharded on dim 1).
    ``torch.distributed.checkpoint`` saves them per process and loads into them in place.
    """
    from torch.distributed.tensor import DTensor, Shard

    if layout.kind != "fsdp2":
        raise ValueError("dtensor_views needs an FSDP2 layout (a posterior of fully_shard parameters).")
    views: dict[str, Tensor] = {}
    for piece in layout.pieces:
        mesh, placements = layout.placements[piece.name]
        shape = layout.shapes[piece.name]
        assert piece.local_shape is not None
        columns = slice(piece.local, piece.local + piece.count)
        for stat, buffer in statistics.items():
            key = sharded_statistic_key(prefix, stat, piece.name)
            if buffer.dim() == 1:
                views[key] = DTensor.from_local(
                    buffer[columns].view(piece.local_shape),
                    mesh,
                    placements,
                    shape=shape,
                    stride=_contiguous_stride(shape),
                )
            elif buffer.shape[0] > 0:
                rows = buffer.shape[0]
                full_shape = torch.Size([rows, *shape])
                views[key] = DTensor.from_local(
                    buffer[:, columns].view(rows, *piece.local_shape),
                    mesh,
                    [Shard(p.dim + 1) for p in placements],
                    shape=full_shape,
                    stride=_contiguous_stride(full_shape),
                )
    return views


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def load_dtensor_views(views: Mapping[str, Tensor], checkpoint: str | os.PathLike[str]) -> None:
    """Read ``views`` (from :func:`dtensor_views`) in place from the distributed checkpoint folder
    ``checkpoint``, where Lightning stored them inside the model's ``state_dict``. A collective."""
    import torch.distributed.checkpoint as dcp

    dcp.load({"state_dict": dict(views)}, checkpoint_id=os.fspath(checkpoint))
