"""Where SWAG state lives in files: the one place that knows the checkpoint and posterior-file layout.

A Lightning checkpoint carries posteriors in two places:

* ``checkpoint["callbacks"][<SWAGCallback state key>]["posterior"]``: the posterior a
  :class:`~lightning_swag.SWAGCallback` was collecting when a *training* checkpoint was written;
* ``checkpoint["swag_posteriors"]``: the posterior(s) of a :class:`~lightning_swag.SWAGModule`
  checkpoint (a list, several for MultiSWAG).

Each posterior is a :meth:`SWAGPosterior.state_dict` (tensors plus ``format_version``,
``param_shapes``, ``max_rank``, ``num_snapshots``). A file written by :meth:`SWAGPosterior.save` holds
one such dict. Plain torch: nothing here imports Lightning.

Sharded posteriors (see :mod:`lightning_swag.sharding`) are stored in today's format wherever the
checkpoint is one file (DDP ``shard=True``, ``ModelParallelStrategy(save_distributed_checkpoint=False)``):
the parts are gathered to rank 0 when it is written. In a *distributed* checkpoint of
``ModelParallelStrategy`` (a folder: ``.metadata``, ``__<rank>_0.distcp`` files and ``meta.pt``),
every process writes its own part: the callback state (in ``meta.pt``) then holds, under
:data:`SHARDED_STATISTICS_KEY`, everything but the tensors, and the tensors sit in the model's
``state_dict`` under ``_swag/<state key>/<statistic>/<parameter name>`` (one entry per parameter and
statistic, with the parameter's global shape; deviations ``[K, *shape]``).
:func:`load_distributed_checkpoint` reads them back in a single process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CALLBACK_POSTERIOR_KEY",
    "MODULE_POSTERIORS_KEY",
    "SHARDED_STATISTICS_KEY",
    "is_posterior_state",
    "load_distributed_checkpoint",
    "load_file",
    "posterior_state_from_entries",
    "posterior_states",
    "sharded_statistic_key",
    "sharded_statistics_prefix",
    "unreadable_file_error",
]

MODULE_POSTERIORS_KEY = "swag_posteriors"
"""Key of a ``SWAGModule`` checkpoint's list of posterior state dicts."""
CALLBACK_POSTERIOR_KEY = "posterior"
"""Key of the posterior state dict inside ``SWAGCallback``'s callback state."""
SHARDED_STATISTICS_KEY = "sharded_statistics"
"""Key, inside ``SWAGCallback``'s callback state, of the description of statistics stored sharded in a
distributed checkpoint (``prefix``, ``param_shapes``, ``max_rank``, ``num_snapshots``, dtypes)."""
SHARDED_STATISTICS = ("mean", "sum_sq_dev", "deviations")
"""The statistics of a posterior, as named in sharded checkpoint keys."""
_POSTERIOR_FIELDS = ("format_version", "param_shapes", "max_rank", "num_snapshots", "mean", "deviations")
_DCP_METADATA = ".metadata"
_LIGHTNING_META = "meta.pt"  # Lightning's ModelParallelStrategy: the non-tensor part, written by rank 0


def load_file(path: str | os.PathLike[str], what: str = "checkpoint", *, mmap: bool = False) -> Any:
    """``torch.load`` a local file (weights only, onto the CPU), with errors that name the file.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file exists but cannot be read as a torch file (empty, truncated, garbage),
            saying which file and that it is not a readable ``what``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} file at {str(path)!r}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise unreadable_file_error(path, what, err) from err


def unreadable_file_error(path: str | os.PathLike[str], what: str, err: BaseException) -> ValueError:
    """The error for a file that exists but cannot be loaded: names the file, its size and the cause."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else None
    first_line = (str(err).splitlines() or [""])[0][:200]
    reason = "it is empty" if size == 0 else f"{type(err).__name__}: {first_line}"
    return ValueError(
        f"{str(path)!r}{f' ({size} bytes)' if size is not None else ''} is not a readable {what}: {reason}. "
        "The file may be truncated (e.g. a run killed while writing it) or not a file saved by torch; "
        "use another copy."
    )


def is_posterior_state(value: Any) -> bool:
    """Whether ``value`` looks like a :meth:`SWAGPosterior.state_dict`."""
    return isinstance(value, Mapping) and all(field in value for field in _POSTERIOR_FIELDS)


def posterior_states(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every posterior state dict a Lightning checkpoint carries: a ``SWAGModule`` checkpoint's own
    list if present, else those of the ``SWAGCallback`` states (in callback order).

    A callback state whose statistics were stored sharded (a distributed checkpoint) is rebuilt from
    the ``_swag/`` entries of ``checkpoint["state_dict"]`` (as :func:`load_distributed_checkpoint`
    returns them).

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
        elif isinstance(state.get(SHARDED_STATISTICS_KEY), Mapping):
            found.append(
                posterior_state_from_entries(
                    state[SHARDED_STATISTICS_KEY], checkpoint.get("state_dict") or {}
                )
            )
    return found


def sharded_statistics_prefix(state_key: str) -> str:
    """The prefix of a callback's sharded statistics in a distributed checkpoint's model state dict."""
    return f"_swag/{state_key}/"


def sharded_statistic_key(prefix: str, statistic: str, name: str) -> str:
    """The state-dict key of one parameter's part of one statistic (``mean``, ``sum_sq_dev``,
    ``deviations``), e.g. ``_swag/SWAGCallback/mean/net.0.weight``."""
    return f"{prefix}{statistic}/{name}"


def posterior_state_from_entries(
    description: Mapping[str, Any], entries: Mapping[str, Any]
) -> dict[str, Any]:
    """An unsharded :meth:`SWAGPosterior.state_dict` from whole per-parameter statistics.

    Args:
        description: the callback state's :data:`SHARDED_STATISTICS_KEY` entry.
        entries: ``{key: tensor}`` holding, for every tracked parameter, the whole (unsharded)
            ``mean``, ``sum_sq_dev`` and ``deviations`` under :func:`sharded_statistic_key` keys.
    """
    prefix, names = description["prefix"], list(description["param_shapes"])
    max_rank = int(description["max_rank"])
    missing = [
        sharded_statistic_key(prefix, stat, name)
        for stat in SHARDED_STATISTICS[: 3 if max_rank else 2]
        for name in names
        if sharded_statistic_key(prefix, stat, name) not in entries
    ]
    if missing:
        raise ValueError(
            f"The SWAG statistics of this checkpoint are stored sharded ({len(missing)} entries such as "
            f"{missing[0]!r} are not in its state_dict): it is the meta.pt of a distributed checkpoint. Read "
            "the checkpoint folder with lightning_swag.checkpoint.load_distributed_checkpoint(folder)."
        )

    def joined(stat: str) -> torch.Tensor:
        return torch.cat([entries[sharded_statistic_key(prefix, stat, n)].reshape(-1) for n in names])

    mean = joined("mean")
    if max_rank:
        deviations = torch.cat(
            [entries[sharded_statistic_key(prefix, "deviations", n)].reshape(max_rank, -1) for n in names],
            dim=1,
        )
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
        raise unreadable_file_error(path / _DCP_METADATA, "distributed checkpoint metadata", err) from err
    entries: dict[str, torch.Tensor] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        description = state.get(SHARDED_STATISTICS_KEY) if isinstance(state, Mapping) else None
        if not isinstance(description, Mapping):
            continue
        for key, meta in stored.items():
            name = key.removeprefix("state_dict.")
            if key.startswith("state_dict.") and name.startswith(description["prefix"]):
                entries[name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if entries:
        with warnings.catch_warnings():  # "... assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"state_dict": entries}, checkpoint_id=os.fspath(path), no_dist=True)
    checkpoint["state_dict"] = entries
    return checkpoint
