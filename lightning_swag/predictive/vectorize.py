"""Vectorise or loop: running a function once per weight sample of a chunk, in one place.

``SWAGModule`` (prediction) and the BatchNorm refresh both call a model under each of ``S`` weight
samples. :class:`SampleMap` does it either with :func:`torch.func.vmap` (one batched call) or with a
plain loop of ``S`` calls, and falls back from the first to the second when ``vmap`` cannot trace
the model (data-dependent control flow, unsupported ops).

Which is faster is a matter of fixed costs against kernels. ``vmap`` replaces ``S`` calls by one,
saving the fixed cost of each call (Python, dispatch, kernel launches), but runs batched kernels
(``bmm``, grouped convolutions) that on a CPU are slower than the plain ones. Measured on a CPU
(``benchmarks/peers.py`` and the crossover table in the README): ``vmap`` wins up to 5.7x when one
forward pass takes well under a millisecond (small models, small batches), and loses up to 5.5x when
it takes longer (a conv net on 256 images). Hence the ``"auto"`` rule:

* on an accelerator: ``vmap`` (one batched call instead of ``S`` launches of small kernels);
* on a CPU: the first sample of the first chunk runs alone and is timed; if it took less than
  :data:`FAST_CALL_SECONDS` the rest run under ``vmap``, otherwise in the loop, and that choice is
  kept. Both give the same results to float rounding; force ``"vmap"`` or ``"loop"`` for
  bit-for-bit reproducibility across machines.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

__all__ = ["FAST_CALL_SECONDS", "SampleMap", "Vectorize", "choose_vectorization"]

Vectorize = Literal["auto", "vmap", "loop"]
"""``"auto"`` (see the module docstring), or force ``"vmap"`` / ``"loop"``."""
FAST_CALL_SECONDS = 1e-3
"""On a CPU, ``"auto"`` vectorises when one forward pass takes less than this."""


class OutputTypeError(TypeError):
    """A model output that cannot be averaged: raised as is, never taken for a vmap tracing failure."""


def choose_vectorization(requested: Vectorize | bool, device: torch.device | str) -> Vectorize:
    """The mode for ``device``: an explicit ``"vmap"``/``"loop"`` (or ``True``/``False``) is kept;
    ``"auto"`` is ``"vmap"`` on accelerators and stays ``"auto"`` (decided by timing) on a CPU."""
    if requested is True or requested == "vmap":
        return "vmap"
    if requested is False or requested == "loop":
        return "loop"
    if requested != "auto":
        raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop' (or a bool), got {requested!r}.")
    return "auto" if torch.device(device).type == "cpu" else "vmap"


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
    raised. With ``mode="auto"`` the first call decides (see the module docstring) and
    :attr:`mode` then says what was chosen; a model ``vmap`` cannot trace then quietly gets the loop.

    Args:
        mode: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :func:`choose_vectorization`).
        owner: who runs the model, for the warning (e.g. ``"SWAGModule"``).
    """

    def __init__(self, mode: Vectorize, owner: str) -> None:
        if mode not in ("auto", "vmap", "loop"):
            raise ValueError(f"mode must be 'auto', 'vmap' or 'loop', got {mode!r}.")
        self.mode: Vectorize = mode
        self.owner = owner
        self._vmap_worked = False
        self._warn_on_fallback = mode == "vmap"

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
        num = next(iter(params.values())).shape[0]
        if self.mode == "auto":
            return self._decide(fn, params, buffers, inputs, restore, model_name, num)
        if self.mode == "vmap":
            saved = {k: v.clone() for k, v in restore.items()} if restore and not self._vmap_worked else None
            try:
                result = vmap(fn, in_dims=(0, 0, None))(params, buffers, inputs)
            except OutputTypeError:
                raise
            except Exception as err:  # noqa: BLE001 - any tracing failure falls back to the loop
                if self._vmap_worked:
                    raise
                if self._warn_on_fallback:
                    warnings.warn(
                        f"{self.owner}: torch.func.vmap could not run {model_name} ({type(err).__name__}: "
                        f"{err}); falling back to one forward pass per sample. Pass vectorize='loop' to "
                        "silence this.",
                        stacklevel=4,
                    )
                self.mode = "loop"
                for name, value in (saved or {}).items():
                    restore[name].copy_(value)  # type: ignore[index]
            else:
                self._vmap_worked = True
                return result
        return self._loop(fn, params, buffers, inputs, range(num))

    def _decide(
        self,
        fn: Callable[[dict[str, Tensor], dict[str, Tensor], Any], Any],
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        inputs: Any,
        restore: Mapping[str, Tensor] | None,
        model_name: str,
        num: int,
    ) -> Any:
        """``"auto"`` on a CPU: time the first (up to) two samples in the loop; the faster of them (the
        first call may pay one-off costs) decides. When ``vmap`` wins, the whole chunk is redone with
        it, so that every sample of a run comes from the same path (the same rounding)."""
        saved = {k: v.clone() for k, v in restore.items()} if restore else None
        pilot = range(min(2, num))
        seconds = []
        outputs = []
        for i in pilot:
            start = time.perf_counter()
            outputs.append(self._loop(fn, params, buffers, inputs, range(i, i + 1)))
            seconds.append(time.perf_counter() - start)
        self.mode = "vmap" if min(seconds) < FAST_CALL_SECONDS else "loop"
        if self.mode == "loop":
            rest = self._loop(fn, params, buffers, inputs, range(len(pilot), num))
            return _concatenate(outputs if rest is None else [*outputs, rest])
        for name, value in (saved or {}).items():
            restore[name].copy_(value)  # type: ignore[index]
        return self(fn, params, buffers, inputs, restore=restore, model_name=model_name)

    def _loop(
        self,
        fn: Callable[[dict[str, Tensor], dict[str, Tensor], Any], Any],
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        inputs: Any,
        samples: range,
    ) -> Any:
        if len(samples) == 0:
            return None
        return _stack(
            [
                fn({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}, inputs)
                for i in samples
            ]
        )


def _concatenate(parts: list[Any]) -> Any:
    if parts[0] is None:
        return None
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(group) for group in zip(*parts, strict=True))
    return torch.cat(parts)
