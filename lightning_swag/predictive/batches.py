"""The batch layout: where the model input and the targets are in a batch, and how the input is passed.

Every part of lightning-swag that reads batches (BMA prediction, ``trainer.test`` metrics,
``tune_scale``/``fit_noise``, the BatchNorm refresh and the prediction writer) goes through
:meth:`SWAGModule.batch_inputs` and :meth:`SWAGModule.batch_targets`, whose defaults are
:func:`default_batch_inputs` and :func:`default_batch_targets`. For other layouts override those two
methods in a subclass of :class:`~lightning_swag.SWAGModule`; nothing else needs to change.

What ``batch_inputs`` returns is passed to the model by :func:`call_model`: a ``Mapping`` as keyword
arguments (``model(**inputs)``, the Hugging Face convention), a ``tuple`` as positional arguments
(``model(*inputs)``), anything else as the one argument (``model(inputs)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CallArguments",
    "call_model",
    "default_batch_inputs",
    "default_batch_targets",
    "first_examples",
    "single_tensor",
    "to_device",
    "without_inference_tensors",
]

LABELS_KEY = "labels"
"""The targets of a ``Mapping`` batch (Hugging Face's name); the other entries are the model input."""

_OVERRIDE_HINT = (
    "For other batch layouts, subclass SWAGModule and override batch_inputs(batch) and "
    "batch_targets(batch); every step (predict, test, tune_scale, the BatchNorm refresh, the "
    "prediction writer) uses them."
)


class CallArguments(NamedTuple):
    """Positional and keyword arguments of one call, passed as they are (e.g. a submodule's captured call)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def default_batch_inputs(batch: Any) -> Any:
    """The model input: a tensor batch itself; a ``Mapping`` (a dict, Hugging Face's ``BatchEncoding``)
    without its ``"labels"``; else the first element of a tuple/list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != LABELS_KEY}
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(
        f"Cannot find the model input in a batch of type {type(batch).__name__}: the default layout is a "
        f"tensor, a mapping (the model input without 'labels') or a tuple/list whose first element is the "
        f"input. {_OVERRIDE_HINT}"
    )


def default_batch_targets(batch: Any) -> Any:
    """The targets: ``batch["labels"]`` of a mapping, or the second element of a tuple/list batch."""
    if isinstance(batch, Mapping) and LABELS_KEY in batch:
        return batch[LABELS_KEY]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise TypeError(
        f"This step needs labelled batches, but got a {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
        f"{' without a labels entry' if isinstance(batch, Mapping) else ''}: the default layout is a "
        f"tuple/list (inputs, targets, ...) or a mapping with 'labels'. {_OVERRIDE_HINT}"
    )


def call_model(fn: Callable[..., Any], inputs: Any) -> Any:
    """``fn`` called with ``inputs`` by the convention of the module docstring."""
    if isinstance(inputs, CallArguments):
        return fn(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, Mapping):
        try:
            return fn(**inputs)
        except TypeError as err:  # no signature inspection on the hot path: explain the failure only
            if "keyword argument" in str(err) and any(f"'{key}'" in str(err) for key in inputs):
                raise TypeError(_keyword_hint(inputs, err)) from err
            raise
    if isinstance(inputs, tuple):
        return fn(*inputs)
    return fn(inputs)


def _keyword_hint(inputs: Mapping[str, Any], err: TypeError) -> str:
    return (
        f"The model does not take the batch's entries {list(inputs)} as keyword arguments ({err}). "
        "SWAGModule passes a mapping returned by batch_inputs as keyword arguments, model(**inputs) (the "
        "Hugging Face convention). If forward takes the whole batch (forward(self, batch)), subclass "
        "SWAGModule and override batch_inputs(batch) to return (batch,): a tuple is passed as positional "
        "arguments, model(*inputs), so the mapping arrives as the one argument."
    )


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (nested tuples, lists, named tuples, mappings) moved to
    ``device``; other values as they are."""
    return _map_tensors(value, lambda t: t.to(device))


def first_examples(value: Any, batch: int, count: int) -> Any | None:
    """``value`` with every tensor inside it whose first dimension is ``batch`` cut to its first
    ``count`` examples (others as they are), or ``None`` when no tensor has that first dimension."""
    cut = 0

    def first(tensor: Tensor) -> Tensor:
        nonlocal cut
        if tensor.dim() == 0 or tensor.shape[0] != batch:
            return tensor
        cut += 1
        return tensor[:count]

    result = _map_tensors(value, first)
    return result if cut else None


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it (nested tuples, lists, named tuples,
    mappings, each rebuilt as its own type where it can be)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        return mapped if type(value) is dict else _rebuilt(value, mapped)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _rebuilt(original: Mapping[str, Any], items: dict[str, Any]) -> Mapping[str, Any]:
    """A mapping of ``original``'s type holding ``items`` (e.g. Hugging Face's ``BatchEncoding``), or a
    dict when that type cannot be built from one."""
    try:
        return type(original)(items)  # type: ignore[call-arg]
    except TypeError:
        return items


def without_inference_tensors(value: Any) -> Any:
    """``value`` with its inference tensors copied to normal ones (nested tuples, lists, mappings, a
    mapping as a dict); other values as they are."""
    if isinstance(value, Tensor):
        return value.clone() if torch.is_inference(value) else value
    if isinstance(value, CallArguments):
        return CallArguments(without_inference_tensors(value.args), without_inference_tensors(value.kwargs))
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(without_inference_tensors(v) for v in value)
    if isinstance(value, Mapping):  # passed as keyword arguments: a dict serves
        return {k: without_inference_tensors(v) for k, v in value.items()}
    return value


def single_tensor(inputs: Any) -> Tensor | None:
    """The input tensor when ``inputs`` is one tensor (the model's only argument), else ``None``."""
    return inputs if isinstance(inputs, Tensor) else None
