"""Vectorise or loop: running a function once per weight sample of a chunk, in one place.

``SWAGModule`` (prediction) and the BatchNorm refresh both call a model under each of ``S`` weight
samples. :class:`SampleMap` does it either with :func:`torch.func.vmap` (one batched call) or with a
plain loop of ``S`` calls, and falls back from the first to the second when ``vmap`` cannot trace
the model (data-dependent control flow, unsupported ops).

Which is faster depends on the device, not on the model alone: ``vmap`` turns the per-sample
weights into batched operations (``bmm``, grouped convolutions), which on a GPU replace ``S`` kernel
launches by one, but on a CPU are slower than the ``S`` plain calls they replace (measured on MLPs,
small conv nets and transformer encoders by ``benchmarks/peers.py``; conv layers become grouped
convolutions, which are slow on CPU). Hence the rule of :func:`choose_vectorization`: ``"auto"``
means a loop on the CPU and ``vmap`` elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

__all__ = ["SampleMap", "Vectorize", "VectorizeChoice", "choose_vectorization"]

Vectorize = Literal["auto", "vmap", "loop"]
"""``"auto"`` (loop on CPU, ``vmap`` on accelerators), or force ``"vmap"`` / ``"loop"``."""
VectorizeChoice = Literal["vmap", "loop"]


class OutputTypeError(TypeError):
    """A model output that cannot be averaged: raised as is, never taken for a vmap tracing failure."""


def choose_vectorization(requested: Vectorize | bool, device: torch.device | str) -> VectorizeChoice:
    """The strategy for ``device``: ``"loop"`` on CPU and ``"vmap"`` elsewhere for ``"auto"``; an explicit
    ``"vmap"``/``"loop"`` (or ``True``/``False``) is kept."""
    if requested is True or requested == "vmap":
        return "vmap"
    if requested is False or requested == "loop":
        return "loop"
    if requested != "auto":
        raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop' (or a bool), got {requested!r}.")
    return "loop" if torch.device(device).type == "cpu" else "vmap"


def _stack(outputs: list[Any]) -> Any:
    first = outputs[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs, strict=True))
    return torch.stack(outputs)


class SampleMap:
    """Calls ``fn(params_i, buffers_i, inputs)`` for every sample ``i`` of a chunk and stacks the results.

    ``params`` and ``buffers`` are ``{name: [S, ...]}``; ``inputs`` is shared by all samples. With
    ``mode="vmap"`` the first call that fails to trace switches this map to the loop for good, with a
    warning (``restore`` names tensors the failed call may have changed in place; they are put back
    before the loop redoes the work). A failure after ``vmap`` has worked once is a real error and is
    raised.

    Args:
        mode: ``"vmap"`` or ``"loop"`` (see :func:`choose_vectorization`).
        owner: who runs the model, for the warning (e.g. ``"SWAGModule"``).
    """

    def __init__(self, mode: VectorizeChoice, owner: str) -> None:
        if mode not in ("vmap", "loop"):
            raise ValueError(f"mode must be 'vmap' or 'loop', got {mode!r}.")
        self.mode: VectorizeChoice = mode
        self.owner = owner
        self._vmap_worked = False

    def __call__(
        self,
        fn: Callable[[dict[str, Tensor], dict[str, Tensor], Any], Any],
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        inputs: Any,
        *,
        restore: Mapping[str, Tensor] | None = None,
        model_name: str = "the model",
    ) -> Any:
        params, buffers = dict(params), dict(buffers)
        if self.mode == "vmap":
            saved = {k: v.clone() for k, v in restore.items()} if restore and not self._vmap_worked else None
            try:
                result = vmap(fn, in_dims=(0, 0, None))(params, buffers, inputs)
            except OutputTypeError:
                raise
            except Exception as err:  # noqa: BLE001 - any tracing failure falls back to the loop
                if self._vmap_worked:
                    raise
                warnings.warn(
                    f"{self.owner}: torch.func.vmap could not run {model_name} ({type(err).__name__}: {err}); "
                    "falling back to one forward pass per sample. Pass vectorize='loop' to silence this.",
                    stacklevel=4,
                )
                self.mode = "loop"
                for name, value in (saved or {}).items():
                    restore[name].copy_(value)  # type: ignore[index]
            else:
                self._vmap_worked = True
                return result
        num = next(iter(params.values())).shape[0]
        return _stack(
            [
                fn({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}, inputs)
                for i in range(num)
            ]
        )
