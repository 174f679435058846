"""The sharding layout: which part of the flat weight vector a process keeps, and how the parts join.

A posterior keeps its statistics for the flat vector of its tracked parameters, concatenated in
parameter order (the *global* vector of ``P`` weights). On each process it keeps a *local* vector:
the concatenation of some pieces of the global one. A :class:`Layout` lists the pieces and knows
everything that differs between the ways of cutting, so the posterior, the checkpoint code and the
prediction code never ask which kind they hold:

* :class:`WholeLayout`: the whole vector (one process, or DDP without ``shard``): the identity;
* :class:`DDPSliceLayout` (``SWAGCallback(shard=True)`` under DDP, every process holding the whole
  model): process ``r`` of ``W`` keeps the slice ``[r·c, min(P, (r+1)·c))`` with ``c = ⌈P/W⌉``
  (``torch.chunk`` semantics), which may cut parameters; samples are joined across processes;
* :class:`FSDP2Layout` (``torch.distributed.fsdp.fully_shard`` on a 1-D mesh, ``Shard(0)``): every
  process keeps its own rows of every parameter (``param.to_local()``); samples stay local and are
  copied into the model's shards for the forward pass.

A new strategy (HSDP, DeepSpeed) is one more subclass. Everything elementwise (Welford moments,
deviation columns, the diagonal noise of a column) works on the local vector unchanged. This is the
only module that tells the kinds apart. Plain torch (``torch.distributed``).
"""

from __future__ import annotations

import functools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_swag.posterior.parameters import named_tracked

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "DDPSliceLayout",
    "FSDP2Layout",
    "Layout",
    "Piece",
    "Span",
    "WholeLayout",
    "all_gather_columns",
    "chunk_rows",
    "gather_columns",
    "has_dtensor_parameters",
    "is_dtensor",
    "layout_for",
    "reshard_fsdp",
]

Span = tuple[int, int, int]
"""``(local start, global start, count)``: a run of columns contiguous both locally and globally."""


@functools.cache
def _dtensor_class() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: Any) -> TypeGuard[DTensor]:
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

    ``local_shape`` is the shape of the piece as a tensor (the whole shape, or an FSDP2 local
    shard's; ``None`` when the piece cuts a parameter's rows, as DDP slices do)."""

    name: str
    start: int
    local: int
    within: int
    count: int
    local_shape: tuple[int, ...] | None = None


def _offsets(shapes: Mapping[str, torch.Size]) -> dict[str, int]:
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    return offsets


class Layout(ABC):
    """The pieces of the global flat weight vector that this process keeps (see the module docstring).

    An abstract base: :class:`WholeLayout`, :class:`DDPSliceLayout` and :class:`FSDP2Layout` (build them
    with :meth:`ddp_slice`, :meth:`from_row_shards` or :func:`layout_for`; ``SWAGPosterior.from_model``
    picks the right one).

    Args:
        shapes: ordered ``{canonical name: global shape}`` of the tracked parameters.
        pieces: the pieces, in local order.
    """

    name = "layout"
    is_sharded = True
    """Whether a process keeps only a part of the weights."""
    joins_samples = False
    """Whether every process needs the other processes' columns to run a sample (a collective)."""
    forward_in_place = False
    """Whether samples are copied into the model's own (sharded) parameters for the forward pass,
    one at a time, instead of being passed to ``functional_call``."""
    per_process_checkpoint = False
    """Whether a distributed checkpoint stores each process's part next to its weight shards
    (:meth:`checkpoint_views`) rather than the whole posterior, gathered into one file."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], pieces: Sequence[Piece]) -> None:
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.pieces = list(pieces)
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
    def ddp_slice(shapes: Mapping[str, Sequence[int]], world_size: int, rank: int) -> DDPSliceLayout:
        """Slice ``rank`` of ``world_size`` of the flat vector (``torch.chunk`` semantics)."""
        return DDPSliceLayout.build(shapes, world_size, rank)

    @staticmethod
    def from_row_shards(
        shapes: Mapping[str, Sequence[int]],
        rows: Mapping[str, tuple[int, int]],
        placements: Mapping[str, tuple[Any, tuple[Any, ...]]] | None = None,
    ) -> FSDP2Layout:
        """The FSDP2 layout from ``{name: (first row, number of rows)}`` of every parameter's local shard."""
        return FSDP2Layout.from_rows(shapes, rows, placements)

    # ------------------------------------------------------------------ views
    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The global ``[start, end)`` ranges of the pieces, in local order."""
        return [(p.start, p.start + p.count) for p in self.pieces]

    @property
    def spans(self) -> list[Span]:
        """``(local start, global start, count)`` runs that are contiguous both locally and globally
        (a slice is one run), without empty ones."""
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

    def piece_views(self, local: Tensor) -> list[Tensor]:
        """Views of a local ``[num_local]`` vector, one per piece (shaped like it where it has a shape)."""
        views = []
        for p in self.pieces:
            view = local[p.local : p.local + p.count]
            views.append(view.view(p.local_shape) if p.local_shape is not None else view)
        return views

    def take(self, flat: Tensor) -> Tensor:
        """The local part ``[..., num_local]`` of a global ``[..., P]`` tensor (a copy)."""
        if flat.shape[-1] != self.num_params:
            raise ValueError(f"Expected a last dimension of {self.num_params}, got {tuple(flat.shape)}.")
        out = flat.new_empty(*flat.shape[:-1], self.num_local)
        for local, start, count in self.spans:
            out[..., local : local + count] = flat[..., start : start + count]
        return out

    def unflatten_local(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: [..., *local shape]}`` views of this process's columns ``[..., num_local]``."""
        if flat.shape[-1] != self.num_local:
            raise ValueError(f"Expected a last dimension of {self.num_local}, got shape {tuple(flat.shape)}.")
        lead = flat.shape[:-1]
        return {
            p.name: flat[..., p.local : p.local + p.count].reshape(*lead, *p.local_shape)
            for p in self.pieces
            if p.local_shape is not None
        }

    def describe(self) -> str:
        """A short description for messages, e.g. ``"ddp slice of 626/1251 weights"``."""
        return f"{self.name} of {self.num_local}/{self.num_params} weights"

    # ------------------------------------------------------------------ what differs by kind
    def fits(self, model: nn.Module) -> bool:
        """Whether this layout's part can be run with ``model`` as it is (FSDP2 shards need an FSDP2
        model, a DDP slice a plain one)."""
        return not has_dtensor_parameters(model)

    def join(self, local: Tensor) -> Tensor:
        """The whole ``[R, P]`` from every process's ``[R, num_local]`` (a collective when sharded)."""
        return all_gather_columns(local, self)

    @abstractmethod
    def model_tensors(self, local: Tensor) -> dict[str, Tensor]:
        """``{name: tensor}`` to run the model with, from this process's ``[..., num_local]`` columns."""

    @abstractmethod
    def write_into(self, model: nn.Module, local: Tensor) -> None:
        """Write this process's columns ``[num_local]`` into ``model``'s tracked parameters, in place."""

    def prepare(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Bring ``model`` into the state this layout reads and writes (FSDP2: resharded)."""

    def checkpoint_views(self, statistics: Mapping[str, Tensor], key: Any) -> dict[str, Tensor] | None:
        """Views of the local statistics that a distributed checkpoint stores per process, keyed
        ``key(statistic, name)``; ``None`` when the layout's statistics are gathered into one file."""
        return None

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


class WholeLayout(Layout):
    """Every weight on this process: local columns are global columns, one piece per parameter."""

    name = "whole"
    is_sharded = False

    def __init__(self, shapes: Mapping[str, Sequence[int]]) -> None:
        sizes = {name: torch.Size(shape) for name, shape in shapes.items()}
        offsets = _offsets(sizes)
        pieces = [Piece(n, offsets[n], offsets[n], 0, math.prod(s), tuple(s)) for n, s in sizes.items()]
        super().__init__(sizes, pieces)

    def take(self, flat: Tensor) -> Tensor:
        if flat.shape[-1] != self.num_params:
            raise ValueError(f"Expected a last dimension of {self.num_params}, got {tuple(flat.shape)}.")
        return flat

    def join(self, local: Tensor) -> Tensor:
        return local

    def model_tensors(self, local: Tensor) -> dict[str, Tensor]:
        return self.unflatten_local(local)

    def write_into(self, model: nn.Module, local: Tensor) -> None:
        named = named_tracked(model)
        with torch.no_grad():
            for name, value in self.unflatten_local(local).items():
                named[name].copy_(value)

    def all_spans(self) -> list[list[Span]]:
        return [self.spans]


class DDPSliceLayout(Layout):
    """A contiguous slice of the flat vector per process; every process holds the whole model."""

    name = "ddp slice"
    joins_samples = True

    @classmethod
    def build(cls, shapes: Mapping[str, Sequence[int]], world_size: int, rank: int) -> DDPSliceLayout:
        """Slice ``rank`` of ``world_size`` (``torch.chunk`` semantics)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
        sizes = {name: torch.Size(shape) for name, shape in shapes.items()}
        offsets = _offsets(sizes)
        total = sum(math.prod(s) for s in sizes.values())
        first, count = chunk_rows(total, world_size, rank)
        pieces, local = [], 0
        for name, shape in sizes.items():
            begin = max(first, offsets[name])
            end = min(first + count, offsets[name] + math.prod(shape))
            if end > begin:
                pieces.append(Piece(name, begin, local, begin - offsets[name], end - begin))
                local += end - begin
        return cls(sizes, pieces)

    def model_tensors(self, local: Tensor) -> dict[str, Tensor]:
        whole = WholeLayout(self.shapes)
        return whole.unflatten_local(self.join(local))

    def unflatten_local(self, flat: Tensor) -> dict[str, Tensor]:
        raise ValueError("A DDP slice cuts parameters; join the columns with all_gather_columns first.")

    def write_into(self, model: nn.Module, local: Tensor) -> None:
        raise ValueError(
            f"This posterior keeps a {self.describe()}, which cannot fill a whole model: gather() it to "
            "one process first (or predict with SWAGModule, which joins the samples)."
        )


class FSDP2Layout(Layout):
    """Every process keeps its own dim-0 rows of every parameter, as FSDP2's ``Shard(0)`` does.

    Args:
        shapes: ordered ``{canonical name: global shape}``.
        pieces: one piece per parameter (empty ones included, so that every process offers the same
            checkpoint keys).
        placements: ``{name: (device mesh, placements)}`` of every parameter, for checkpoint views.
    """

    name = "fsdp2 shards"
    forward_in_place = True
    per_process_checkpoint = True

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        pieces: Sequence[Piece],
        placements: Mapping[str, tuple[Any, tuple[Any, ...]]] | None = None,
    ) -> None:
        super().__init__(shapes, pieces)
        self.placements = dict(placements or {})

    @classmethod
    def from_rows(
        cls,
        shapes: Mapping[str, Sequence[int]],
        rows: Mapping[str, tuple[int, int]],
        placements: Mapping[str, tuple[Any, tuple[Any, ...]]] | None = None,
    ) -> FSDP2Layout:
        """The layout from ``{name: (first row, number of rows)}`` of every parameter's local shard."""
        sizes = {name: torch.Size(shape) for name, shape in shapes.items()}
        offsets = _offsets(sizes)
        pieces, local = [], 0
        for name, shape in sizes.items():
            first, count_rows = rows[name]
            row_numel = math.prod(shape[1:])
            count = count_rows * row_numel
            within = first * row_numel
            pieces.append(Piece(name, offsets[name] + within, local, within, count, (count_rows, *shape[1:])))
            local += count
        return cls(sizes, pieces, placements)

    @classmethod
    def of_parameters(cls, named: Sequence[tuple[str, Tensor]]) -> FSDP2Layout:
        """The layout of parameters sharded by ``fully_shard``: each must be a DTensor on a 1-D device
        mesh that spans all processes, with placement ``Shard(0)``; the local rows (``torch.chunk``
        semantics) are checked against ``to_local()``.

        Raises:
            ValueError: a parameter is a plain tensor, or sharded another way (tensor parallelism,
                HSDP, ``shard_placement_fn``), naming it and saying what is supported.
        """
        shapes, rows, placements = {}, {}, {}
        for name, param in named:
            shapes[name], rows[name], placements[name] = _fsdp2_rows(name, param)
        return cls.from_rows(shapes, rows, placements)

    def fits(self, model: nn.Module) -> bool:
        return has_dtensor_parameters(model)

    def join(self, local: Tensor) -> Tensor:
        raise ValueError("FSDP2 shards are used in place; gather() the posterior for whole samples.")

    def model_tensors(self, local: Tensor) -> dict[str, Tensor]:
        return self.unflatten_local(local)

    def write_into(self, model: nn.Module, local: Tensor) -> None:
        reshard_fsdp(model)
        named = named_tracked(model)
        with torch.no_grad():
            for name, value in self.unflatten_local(local).items():
                cast("DTensor", named[name]).to_local().copy_(value)

    def prepare(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        reshard_fsdp(model)

    def checkpoint_views(self, statistics: Mapping[str, Tensor], key: Any) -> dict[str, Tensor]:
        """Per-parameter DTensors over views of the local statistics, with the parameters' mesh and
        placements: ``[num_local]`` vectors become DTensors of the parameter's shape, ``[K, num_local]``
        matrices ``[K, *shape]`` DTensors sharded on dim 1. ``torch.distributed.checkpoint`` saves them
        per process and loads into them in place."""
        from torch.distributed.tensor import DTensor, Shard

        views: dict[str, Tensor] = {}
        where: Sequence[Any]  # the parameter's placements, or Shard(dim + 1) for the stacked rows
        for piece in self.pieces:
            mesh, placements = self.placements[piece.name]
            shape = self.shapes[piece.name]
            assert piece.local_shape is not None
            columns = slice(piece.local, piece.local + piece.count)
            for stat, buffer in statistics.items():
                if buffer.dim() == 1:
                    local, full, where = buffer[columns].view(piece.local_shape), shape, placements
                elif buffer.shape[0] > 0:
                    rows = buffer.shape[0]
                    local = buffer[:, columns].view(rows, *piece.local_shape)
                    full, where = torch.Size([rows, *shape]), [Shard(p.dim + 1) for p in placements]
                else:
                    continue
                views[key(stat, piece.name)] = DTensor.from_local(
                    local, mesh, where, shape=full, stride=torch.empty(full, device="meta").stride()
                )
        return views


def _fsdp2_rows(name: str, param: Tensor) -> tuple[torch.Size, tuple[int, int], tuple[Any, tuple[Any, ...]]]:
    """``(global shape, (first row, rows), (mesh, placements))`` of one ``fully_shard`` parameter."""
    from torch.distributed.tensor import DTensor, Shard

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
        raise ValueError(f"Parameter {name!r} is a 0-dim DTensor; FSDP2 shards dim 0 of each parameter.")
    first, count = chunk_rows(shape[0], mesh.size(), mesh.get_local_rank())
    local_shape = tuple(param.to_local().shape)
    if local_shape != (count, *shape[1:]):
        raise ValueError(
            f"Parameter {name!r}: the local shard has shape {local_shape}, but torch.chunk semantics "
            f"on dim 0 give {(count, *shape[1:])} for process {mesh.get_local_rank()} of {mesh.size()}; "
            "this FSDP2 sharding is not supported."
        )
    return shape, (first, count), (mesh, tuple(param.placements))


def layout_for(named: Sequence[tuple[str, Tensor]], shard: bool) -> Layout:
    """The layout for these parameters: FSDP2 when any is a DTensor; a DDP slice when ``shard`` and
    more than one process runs; otherwise the whole vector."""
    if any(is_dtensor(p) for _, p in named):
        return FSDP2Layout.of_parameters(named)
    if shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shapes = {n: p.shape for n, p in named}
        return DDPSliceLayout.build(shapes, dist.get_world_size(), dist.get_rank())
    return WholeLayout({n: p.shape for n, p in named})


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


def gather_columns(local: Tensor, layout: Layout, dst: int = 0, out: Tensor | None = None) -> Tensor | None:
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


def all_gather_columns(local: Tensor, layout: Layout) -> Tensor:
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


def load_checkpoint_views(views: Mapping[str, Tensor], checkpoint: str | os.PathLike[str]) -> None:
    """Read ``views`` (from :meth:`FSDP2Layout.checkpoint_views`) in place from the distributed
    checkpoint folder ``checkpoint``, where Lightning stored them in the model's ``state_dict``. A
    collective."""
    import torch.distributed.checkpoint as dcp

    dcp.load({"state_dict": dict(views)}, checkpoint_id=os.fspath(checkpoint))
