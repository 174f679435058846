"""The file format: every key under which SWAG state is stored, its versions, and the checks on reading.

A posterior is stored as a *posterior state*: a dict with ``format_version``, ``param_shapes``
(ordered ``{name: shape}``), ``max_rank``, ``num_snapshots`` and the tensors ``mean`` ``[P]``,
``sum_sq_dev`` ``[P]`` (Welford's sum of squared deviations) and ``deviations`` ``[max_rank, P]``
(the ring buffer). :meth:`SWAGPosterior.save` writes one to a file. A Lightning checkpoint carries
them in two places:

* ``checkpoint["callbacks"][<SWAGCallback state key>]["posterior"]``: the posterior a
  :class:`~lightning_swag.SWAGCallback` was collecting when a *training* checkpoint was written;
* ``checkpoint["swag_posteriors"]``: the posterior(s) of a :class:`~lightning_swag.SWAGModule`
  checkpoint (a list, several for MultiSWAG).

In a *distributed* checkpoint of ``ModelParallelStrategy`` (a folder: ``.metadata``,
``__<rank>_0.distcp`` files and ``meta.pt``) every process writes its own part: the callback state
holds, under ``"sharded_statistics"``, a *sharded description* (everything but the tensors), and the
tensors sit in the model's ``state_dict`` under ``_swag/<state key>/<statistic>/<parameter name>``
(the parameter's global shape; deviations ``[K, *shape]``). :func:`load_distributed_checkpoint`
reads them back in one process.

Every state read is upgraded to the current version and checked (:func:`read_posterior_state`):
shapes, counts and finiteness, with errors that name the field and the file. A new version is one
function in :data:`_UPGRADES`. Plain torch: nothing here imports Lightning.

Files are read weights-only (:func:`load_file`): unpickling a file can run any code it holds, so
every checkpoint and posterior the package reads is loaded with ``torch.load(..., weights_only=True)``,
local or remote. A file that needs more than tensors and plain Python values is refused with
:class:`UnsafeFileError`, which keeps torch's explanation and says how a user who trusts the file can
allow it; a file that cannot be read at all (empty, truncated, garbage) gives a ``ValueError`` that
names it.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch
from torch import Tensor

__all__ = [
    "CALLBACK_POSTERIOR_KEY",
    "FORMAT_VERSION",
    "MODULE_POSTERIORS_KEY",
    "SHARDED_DESCRIPTION_KEY",
    "STATISTIC_NAMES",
    "CallbackState",
    "UnsafeFileError",
    "file_error",
    "PosteriorState",
    "callback_state",
    "is_posterior_state",
    "load_distributed_checkpoint",
    "load_file",
    "posterior_state_from_entries",
    "posterior_states",
    "read_callback_state",
    "read_posterior_state",
    "sharded_description",
    "sharded_statistic_key",
    "sharded_statistics_prefix",
    "unreadable_file_error",
    "wrapped_model_state",
]

_WEIGHTS_ONLY_FAILED = "Weights only load failed"
# what torch's weights-only unpickler says when a file asks for an object it does not allow (as
# opposed to bytes that are no pickle at all: "Unsupported operand", "String is too long")
_UNSAFE_MARKERS = (
    "GLOBAL ",
    "allowlisted via `add_safe_globals`",
    "Trying to call reduce",
    "must be imported to load",
)
_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeFileError(ValueError):
    """A torch file that loading with ``weights_only=True`` refused: unpickling it could run code."""


def _needs_unpickling(err: BaseException) -> bool:
    message = str(err)
    return _WEIGHTS_ONLY_FAILED in message and any(marker in message for marker in _UNSAFE_MARKERS)


def file_error(source: str | os.PathLike[str], what: str, err: BaseException) -> ValueError:
    """The error for a file (a path or an address) torch could not load: :class:`UnsafeFileError` when it
    needs unpickling, else :func:`unreadable_file_error`."""
    if not _needs_unpickling(err):
        return unreadable_file_error(source, what, err)
    found = _GLOBAL_NAME.search(str(err))
    needs = f"unpickling of type {found.group(1)}" if found else "unpickling of Python objects"
    return UnsafeFileError(
        f"{str(source)!r} is a {what} that needs {needs}, which lightning-swag refuses: loading a file "
        "with pickled objects can run code from it, so only tensors and plain Python values are read "
        "(torch.load(weights_only=True)). If you trust this file, allow the type explicitly with "
        "torch.serialization.add_safe_globals([...]) before loading it, or load it yourself with "
        "torch.load(path, weights_only=False) and pass what you need on (e.g. SWAGModule(model, "
        f"posterior=...)). torch said: {err}"
    )


def unreadable_file_error(path: str | os.PathLike[str], what: str, err: BaseException) -> ValueError:
    """The error for a file that exists but cannot be loaded: names the file, its size and the cause."""
    size = Path(path).stat().st_size if Path(path).is_file() else None
    first_line = (str(err).splitlines() or [""])[0][:200]
    reason = "it is empty" if size == 0 else f"{type(err).__name__}: {first_line}"
    return ValueError(
        f"{str(path)!r}{f' ({size} bytes)' if size is not None else ''} is not a readable {what}: {reason}. "
        "The file may be truncated (e.g. a run killed while writing it) or not a file saved by torch; "
        "use another copy."
    )


def load_file(path: str | os.PathLike[str], what: str = "checkpoint", *, mmap: bool = False) -> Any:
    """``torch.load`` a local file (weights only, onto the CPU), with errors that name the file.

    Raises:
        FileNotFoundError: there is no such file.
        UnsafeFileError: the file needs unpickling (a ``ValueError``; see the module docstring).
        ValueError: the file exists but cannot be read as a torch file (empty, truncated, garbage).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} file at {str(path)!r}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise file_error(path, what, err) from err


FORMAT_VERSION = 2
"""The version written. Format 1 stored the second moment ``sq_mean`` instead of ``sum_sq_dev``."""
MODULE_POSTERIORS_KEY = "swag_posteriors"
"""Key of a ``SWAGModule`` checkpoint's list of posterior states."""
CALLBACK_POSTERIOR_KEY = "posterior"
"""Key of the posterior state inside ``SWAGCallback``'s callback state."""
SHARDED_DESCRIPTION_KEY = "sharded_statistics"
"""Key, inside ``SWAGCallback``'s callback state, of the sharded description of statistics stored per
process in a distributed checkpoint."""
STATISTIC_NAMES = ("mean", "sum_sq_dev", "deviations")
"""The tensors of a posterior state, in the order they are stored."""
_FIELDS = ("format_version", "param_shapes", "max_rank", "num_snapshots", "mean", "deviations")
_CALLBACK_FIELDS = ("last_epoch", "last_step", "swa_schedulers", "tracked")
_EXTRA_STATE_KEY = "_extra_state"  # torch.nn.Module's key for get_extra_state
_DCP_METADATA = ".metadata"
_LIGHTNING_META = "meta.pt"  # Lightning's ModelParallelStrategy: the non-tensor part, written by rank 0


# ---------------------------------------------------------------------- posterior states
@dataclass
class PosteriorState:
    """A posterior state of the current format, checked (see :func:`read_posterior_state`)."""

    param_shapes: dict[str, torch.Size]
    max_rank: int
    num_snapshots: int
    mean: Tensor
    sum_sq_dev: Tensor
    deviations: Tensor

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes.values())

    def to_dict(self) -> dict[str, Any]:
        """The state as stored (tensors as they are: move them to the CPU before writing a file)."""
        return {
            "format_version": FORMAT_VERSION,
            "param_shapes": {n: list(s) for n, s in self.param_shapes.items()},
            "max_rank": self.max_rank,
            "num_snapshots": self.num_snapshots,
            "mean": self.mean,
            "sum_sq_dev": self.sum_sq_dev,
            "deviations": self.deviations,
        }


def is_posterior_state(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """Whether ``value`` looks like a posterior state (the fields are there; not yet checked)."""
    return isinstance(value, Mapping) and all(field in value for field in _FIELDS)


def _from_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 stored ``E[θ²]`` as ``sq_mean``; format 2 stores ``M₂ = n · var``."""
    mean, sq_mean, n = state.pop("mean"), state.pop("sq_mean", None), state["num_snapshots"]
    if not isinstance(sq_mean, Tensor) or not isinstance(mean, Tensor) or not isinstance(n, int):
        return {**state, "mean": mean, "sum_sq_dev": sq_mean}  # the checks below name what is wrong
    variance = (sq_mean.double() - mean.double().square()).clamp_(min=0)
    return {**state, "mean": mean, "sum_sq_dev": (variance * n).to(mean.dtype), "format_version": 2}


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_format_1}
"""``{version: function}`` turning a state of that version into one of the next version."""


class _Check:
    """Raises errors that name the field and where the state came from."""

    def __init__(self, source: str | os.PathLike[str] | None) -> None:
        self.where = f"{str(source)!r}: " if source is not None else ""

    def fail(self, field: str, problem: str) -> ValueError:
        return ValueError(
            f"{self.where}the SWAG posterior state is damaged or not from this package: field {field!r} "
            f"{problem}. Use another copy of the file or checkpoint."
        )

    def integer(self, state: Mapping[str, Any], field: str, minimum: int) -> int:
        value = state.get(field)
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(field, f"must be an int >= {minimum}, got {value!r}")
        return value

    def tensor(
        self, state: Mapping[str, Any], field: str, shape: tuple[int, ...], non_negative: bool = False
    ) -> Tensor:
        value = state.get(field)
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise self.fail(field, f"must be a floating-point tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise self.fail(
                field, f"has shape {tuple(value.shape)}, but param_shapes and max_rank give {shape}"
            )
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise self.fail(field, "holds NaN or infinite values")
        if non_negative and value.numel() and bool((value < 0).any()):
            raise self.fail(
                field,
                f"holds negative values (down to {float(value.min()):.3g}), impossible for a sum of squares",
            )
        return value

    def shapes(self, state: Mapping[str, Any]) -> dict[str, torch.Size]:
        value = state.get("param_shapes")
        valid = (
            isinstance(value, Mapping)
            and value
            and all(
                isinstance(n, str)
                and isinstance(s, (list, tuple, torch.Size))
                and all(isinstance(d, int) and d >= 0 for d in s)
                for n, s in value.items()
            )
        )
        if not valid or not isinstance(value, Mapping):
            raise self.fail("param_shapes", "must map parameter names to shapes (lists of ints >= 0)")
        return {n: torch.Size(s) for n, s in value.items()}


def read_posterior_state(state: Any, source: str | os.PathLike[str] | None = None) -> PosteriorState:
    """Upgrade a stored posterior state to the current format and check it.

    Args:
        state: what was stored (a mapping with the fields of the module docstring).
        source: the file or checkpoint it came from, named in errors.

    Raises:
        ValueError: a field is missing, of the wrong type or shape, non-finite, negative where it
            cannot be, or the version is unknown; the message names the field and ``source``.
    """
    check = _Check(source)
    if not is_posterior_state(state):
        found = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
        missing = [f for f in _FIELDS if not isinstance(state, Mapping) or f not in state]
        raise check.fail(missing[0] if missing else "?", f"is missing (found {found})")
    state = dict(state)
    version = state.get("format_version")
    while version != FORMAT_VERSION:
        if version not in _UPGRADES:
            raise check.fail(
                "format_version",
                f"is {version!r}; this version reads formats {sorted([*_UPGRADES, FORMAT_VERSION])}",
            )
        state = _UPGRADES[version](state)
        version = state.get("format_version")
    shapes = check.shapes(state)
    num_params = sum(math.prod(s) for s in shapes.values())
    max_rank = check.integer(state, "max_rank", 0)
    return PosteriorState(
        param_shapes=shapes,
        max_rank=max_rank,
        num_snapshots=check.integer(state, "num_snapshots", 0),
        mean=check.tensor(state, "mean", (num_params,)),
        sum_sq_dev=check.tensor(state, "sum_sq_dev", (num_params,), non_negative=True),
        deviations=check.tensor(state, "deviations", (max_rank, num_params)),
    )


def posterior_states(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every posterior state a Lightning checkpoint carries: a ``SWAGModule`` checkpoint's own list if
    present, else those of the ``SWAGCallback`` states (in callback order). Statistics stored sharded
    (a distributed checkpoint) are rebuilt from the ``_swag/`` entries of ``checkpoint["state_dict"]``
    (as :func:`load_distributed_checkpoint` returns them).

    Raises:
        ValueError: the statistics are sharded but not in ``checkpoint["state_dict"]`` (the
            ``meta.pt`` of a distributed checkpoint read alone).
    """
    own = checkpoint.get(MODULE_POSTERIORS_KEY)
    if own:
        return [dict(state) for state in own]
    found = []
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, Mapping):
            continue
        posterior = state.get(CALLBACK_POSTERIOR_KEY)
        if is_posterior_state(posterior):
            found.append(dict(posterior))
        elif isinstance(state.get(SHARDED_DESCRIPTION_KEY), Mapping):
            found.append(
                posterior_state_from_entries(
                    state[SHARDED_DESCRIPTION_KEY], checkpoint.get("state_dict") or {}
                )
            )
    return found


def wrapped_model_state(state_dict: Mapping[str, Any], own_keys: set[str], prefix: str) -> Mapping[str, Any]:
    """A model ``state_dict`` as the wrapper that holds the model under ``prefix`` expects it: a
    training checkpoint of the bare model gets ``prefix`` added to its keys when that makes them fit."""
    if not state_dict or set(state_dict) <= own_keys:
        return state_dict
    prefixed = {f"{prefix}{k}": v for k, v in state_dict.items()}
    return prefixed if set(prefixed) <= own_keys else state_dict


def module_extra_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """``SWAGModule``'s extra state (``nn.Module.get_extra_state``): its posteriors, so that a
    ``SWAGModule`` nested in another module keeps them in the outer module's checkpoint."""
    return {MODULE_POSTERIORS_KEY: states}


def read_module_extra_state(extra: Any) -> list[dict[str, Any]]:
    """The posterior states of :func:`module_extra_state` (none for an empty placeholder)."""
    if not isinstance(extra, Mapping):
        return []
    return list(extra.get(MODULE_POSTERIORS_KEY) or [])


def pop_module_extra_state(state_dict: dict[str, Any], prefix: str = "") -> Any:
    """Remove ``SWAGModule``'s extra-state entry from a state dict (a top-level checkpoint stores the
    posteriors once, under :data:`MODULE_POSTERIORS_KEY`)."""
    return state_dict.pop(prefix + _EXTRA_STATE_KEY, None)


def add_module_extra_placeholder(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Give a state dict without ``SWAGModule``'s extra-state entry an empty one (strict loading)."""
    state_dict.setdefault(prefix + _EXTRA_STATE_KEY, {})


# ---------------------------------------------------------------------- callback state
@dataclass
class CallbackState:
    """What ``SWAGCallback`` keeps in a checkpoint besides its posterior."""

    posterior: dict[str, Any] | None
    sharded: dict[str, Any] | None
    last_epoch: int
    last_step: int
    swa_schedulers: list[dict[str, Any]]
    tracked: list[str] | None


def callback_state(
    posterior: dict[str, Any] | None,
    last_epoch: int,
    last_step: int,
    swa_schedulers: list[dict[str, Any]],
    tracked: list[str] | None,
) -> dict[str, Any]:
    """The callback state dict (the sharded description is added by the callback when it applies)."""
    values = (last_epoch, last_step, swa_schedulers, tracked)
    return {CALLBACK_POSTERIOR_KEY: posterior, **dict(zip(_CALLBACK_FIELDS, values, strict=True))}


def read_callback_state(state: Mapping[str, Any]) -> CallbackState:
    """The fields of a callback state (older checkpoints lack some; they get their defaults)."""
    tracked = state.get("tracked")
    return CallbackState(
        posterior=state.get(CALLBACK_POSTERIOR_KEY),
        sharded=state.get(SHARDED_DESCRIPTION_KEY),
        last_epoch=int(state.get("last_epoch", -1)),
        last_step=int(state.get("last_step", 0)),
        swa_schedulers=list(state.get("swa_schedulers", [])),
        tracked=list(tracked) if tracked is not None else None,
    )


# ---------------------------------------------------------------------- sharded statistics
def sharded_statistics_prefix(state_key: str) -> str:
    """The prefix of a callback's sharded statistics in a distributed checkpoint's model state dict."""
    return f"_swag/{state_key}/"


def sharded_statistic_key(prefix: str, statistic: str, name: str) -> str:
    """The state-dict key of one parameter's part of one statistic, e.g.
    ``_swag/SWAGCallback/mean/net.0.weight``."""
    return f"{prefix}{statistic}/{name}"


def sharded_description(
    prefix: str,
    param_shapes: Mapping[str, torch.Size],
    max_rank: int,
    num_snapshots: int,
    moment_dtype: torch.dtype,
    deviation_dtype: torch.dtype,
) -> dict[str, Any]:
    """Everything of a posterior stored per process but its tensors (plain Python values)."""
    return {
        "prefix": prefix,
        "format_version": FORMAT_VERSION,
        "param_shapes": {n: list(s) for n, s in param_shapes.items()},
        "max_rank": max_rank,
        "num_snapshots": num_snapshots,
        "moment_dtype": str(moment_dtype).removeprefix("torch."),
        "deviation_dtype": str(deviation_dtype).removeprefix("torch."),
    }


@dataclass(frozen=True)
class ShardedDescription:
    """The fields of :func:`sharded_description`, read back."""

    prefix: str
    param_shapes: dict[str, torch.Size]
    max_rank: int
    num_snapshots: int
    moment_dtype: torch.dtype
    deviation_dtype: torch.dtype


def read_sharded_description(description: Mapping[str, Any]) -> ShardedDescription:
    """The fields of a stored :func:`sharded_description`."""
    return ShardedDescription(
        prefix=str(description["prefix"]),
        param_shapes={n: torch.Size(s) for n, s in description["param_shapes"].items()},
        max_rank=int(description["max_rank"]),
        num_snapshots=int(description["num_snapshots"]),
        moment_dtype=getattr(torch, description["moment_dtype"]),
        deviation_dtype=getattr(torch, description["deviation_dtype"]),
    )


def saved_max_rank(state: Mapping[str, Any]) -> int:
    """The ``max_rank`` of a stored posterior state or sharded description."""
    return int(state["max_rank"])


def has_snapshots(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a checkpoint holds a posterior with at least one snapshot."""
    return any(int(state.get("num_snapshots", 0)) > 0 for state in posterior_states(checkpoint))


def posterior_state_from_entries(
    description: Mapping[str, Any], entries: Mapping[str, Any]
) -> dict[str, Any]:
    """A whole posterior state from whole per-parameter statistics.

    Args:
        description: a :func:`sharded_description`.
        entries: ``{key: tensor}`` holding, for every tracked parameter, the whole (unsharded)
            ``mean``, ``sum_sq_dev`` and ``deviations`` under :func:`sharded_statistic_key` keys.
    """
    prefix, names = description["prefix"], list(description["param_shapes"])
    max_rank = int(description["max_rank"])
    missing = [
        sharded_statistic_key(prefix, stat, name)
        for stat in STATISTIC_NAMES[: 3 if max_rank else 2]
        for name in names
        if sharded_statistic_key(prefix, stat, name) not in entries
    ]
    if missing:
        raise ValueError(
            f"The SWAG statistics of this checkpoint are stored sharded ({len(missing)} entries such as "
            f"{missing[0]!r} are not in its state_dict): it is the meta.pt of a distributed checkpoint. Read "
            "the checkpoint folder with lightning_swag.posterior.format.load_distributed_checkpoint(folder)."
        )

    def joined(stat: str, rows: int | None = None) -> Tensor:
        parts = [entries[sharded_statistic_key(prefix, stat, n)] for n in names]
        if rows is None:
            return torch.cat([p.reshape(-1) for p in parts])
        return torch.cat([p.reshape(rows, -1) for p in parts], dim=1)

    mean = joined("mean")
    if max_rank:
        deviations = joined("deviations", max_rank)
    else:
        dtype = getattr(torch, str(description["deviation_dtype"]).removeprefix("torch."))
        deviations = torch.zeros(0, mean.numel(), dtype=dtype)
    return {
        "format_version": int(description["format_version"]),
        "param_shapes": {n: list(s) for n, s in description["param_shapes"].items()},
        "max_rank": max_rank,
        "num_snapshots": int(description["num_snapshots"]),
        "mean": mean,
        "sum_sq_dev": joined("sum_sq_dev"),
        "deviations": deviations,
    }


def load_distributed_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``ModelParallelStrategy`` distributed checkpoint folder in one process: its ``meta.pt``
    (callback states, loops, ...) with ``state_dict`` holding the whole SWAG statistics of every
    ``SWAGCallback`` that stored them sharded (not the model weights). :func:`posterior_states` of the
    result gives the unsharded posteriors. Runs without a process group; the host needs memory for
    the whole posterior.

    Raises:
        FileNotFoundError: ``folder`` is not a distributed checkpoint folder.
        ValueError: a file in it cannot be read.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(folder)
    if not (path / _DCP_METADATA).is_file() or not (path / _LIGHTNING_META).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a distributed checkpoint folder (it needs {_DCP_METADATA} and {_LIGHTNING_META}, "
            "as Lightning's ModelParallelStrategy writes them)."
        )
    checkpoint = dict(load_file(path / _LIGHTNING_META, "distributed checkpoint metadata"))
    try:
        stored = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise file_error(path / _DCP_METADATA, "distributed checkpoint metadata", err) from err
    entries: dict[str, Tensor] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        description = state.get(SHARDED_DESCRIPTION_KEY) if isinstance(state, Mapping) else None
        if not isinstance(description, Mapping):
            continue
        for key, meta in stored.items():
            name = key.removeprefix("state_dict.")
            if key.startswith("state_dict.") and name.startswith(description["prefix"]):
                tensor_meta = cast("dcp.TensorStorageMetadata", meta)  # the posterior's entries are tensors
                entries[name] = torch.empty(tuple(tensor_meta.size), dtype=tensor_meta.properties.dtype)
    if entries:
        with warnings.catch_warnings():  # "... assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"state_dict": entries}, checkpoint_id=os.fspath(path), no_dist=True)
    checkpoint["state_dict"] = entries
    return checkpoint
