"""Reading torch files safely: weights only, with errors that say which file and why.

Unpickling a file can run any code it holds, so every checkpoint and posterior the package reads is
loaded with ``torch.load(..., weights_only=True)``, local or remote. A file that needs more than
tensors and plain Python values is refused with :class:`UnsafeFileError`, which keeps torch's
explanation and says how a user who trusts the file can allow it. A file that cannot be read at all
(empty, truncated, garbage) gives a ``ValueError`` that names it. Plain torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeFileError", "file_error", "load_file", "unreadable_file_error"]

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
