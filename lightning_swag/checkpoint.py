"""Where SWAG state lives in files: the one place that knows the checkpoint and posterior-file layout.

A Lightning checkpoint carries posteriors in two places:

* ``checkpoint["callbacks"][<SWAGCallback state key>]["posterior"]``: the posterior a
  :class:`~lightning_swag.SWAGCallback` was collecting when a *training* checkpoint was written;
* ``checkpoint["swag_posteriors"]``: the posterior(s) of a :class:`~lightning_swag.SWAGModule`
  checkpoint (a list, several for MultiSWAG).

Each posterior is a :meth:`SWAGPosterior.state_dict` (tensors plus ``format_version``,
``param_shapes``, ``max_rank``, ``num_snapshots``). A file written by :meth:`SWAGPosterior.save` holds
one such dict. Plain torch: nothing here imports Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CALLBACK_POSTERIOR_KEY",
    "MODULE_POSTERIORS_KEY",
    "is_posterior_state",
    "load_file",
    "posterior_states",
    "unreadable_file_error",
]

MODULE_POSTERIORS_KEY = "swag_posteriors"
"""Key of a ``SWAGModule`` checkpoint's list of posterior state dicts."""
CALLBACK_POSTERIOR_KEY = "posterior"
"""Key of the posterior state dict inside ``SWAGCallback``'s callback state."""
_POSTERIOR_FIELDS = ("format_version", "param_shapes", "max_rank", "num_snapshots", "mean", "deviations")


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
    list if present, else those of the ``SWAGCallback`` states (in callback order)."""
    own = checkpoint.get(MODULE_POSTERIORS_KEY)
    if own:
        return [dict(state) for state in own]
    found = []
    for state in (checkpoint.get("callbacks") or {}).values():
        posterior = state.get(CALLBACK_POSTERIOR_KEY) if isinstance(state, Mapping) else None
        if is_posterior_state(posterior):
            found.append(dict(posterior))
    return found
