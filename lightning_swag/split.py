"""Subset posteriors: run the part of the network the posterior does not touch once per batch.

When every tracked parameter lives in one submodule (a head, the last block, a classifier) and that
submodule's output *is* the model's output, the rest of the network computes the same features for
every weight sample. :class:`SplitForward` then runs the model once per batch up to the submodule
(capturing its call arguments with a forward pre-hook, which stops the forward there) and only the
submodule under the weight samples.

:func:`find_split` proposes the submodule; :meth:`SplitForward.verify` checks, at the first batch,
that the model's output is the submodule's output object, that the submodule's inputs do not depend
on the tracked weights and that the split path reproduces the full path exactly; else prediction
keeps the full path. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_swag.batches import CallArguments, call_model
from lightning_swag.parameters import all_names, canonical_name

__all__ = ["SplitForward", "find_split"]


class _Captured(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the pre-hook to stop the forward once the submodule's arguments are captured."""


def _common_prefix(names: Sequence[str]) -> str:
    """The longest common module path of the modules owning ``names`` (``""`` when none)."""
    parts = [name.split(".")[:-1] for name in names]  # the owning modules
    prefix: list[str] = []
    for segments in zip(*parts, strict=False):
        if len(set(segments)) != 1:
            break
        prefix.append(segments[0])
    return ".".join(prefix)


def find_split(model: nn.Module, tracked: Sequence[str]) -> SplitForward | None:
    """The smallest submodule that owns every tracked parameter (names inside ``model``), when it is
    not the model itself and no tracked tensor is shared with a module outside it (weight tying)."""
    prefix = _common_prefix(tracked)
    if not prefix:
        return None
    inside = prefix + "."
    canonical_tracked = {canonical_name(n) for n in tracked}
    for names in all_names(model).values():
        if canonical_tracked.intersection(names) and not all(
            n.startswith(canonical_name(inside)) for n in names
        ):
            return None  # a tied tensor is also used outside the submodule
    try:
        submodule = model.get_submodule(prefix)
    except AttributeError:
        return None
    return SplitForward(model, prefix, submodule)


class SplitForward:
    """The model cut at ``submodule`` (see the module docstring).

    Args:
        model: the whole network.
        prefix: the submodule's name inside ``model``.
        submodule: ``model.get_submodule(prefix)``.
    """

    def __init__(self, model: nn.Module, prefix: str, submodule: nn.Module) -> None:
        self.model = model
        self.prefix = prefix
        self.submodule = submodule

    def relative(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` named inside the submodule (the model's names without the prefix); others dropped."""
        start = len(self.prefix) + 1
        return {name[start:]: value for name, value in tensors.items() if name.startswith(self.prefix + ".")}

    def capture(self, inputs: Any) -> CallArguments:
        """Run the model on ``inputs`` up to the submodule and return the submodule's call arguments."""
        captured: list[CallArguments] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append(CallArguments(tuple(args), dict(kwargs)))
            raise _Captured

        handle = self.submodule.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            call_model(self.model, inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{self.prefix!r} was not called by the model's forward.")
        return captured[0]

    def verify(
        self,
        inputs: Any,
        base: Mapping[str, Tensor],
        tracked: Mapping[str, Tensor],
        extract: Callable[[Any], Any],
    ) -> str | None:
        """Why the split path cannot replace the full one for this model, or ``None`` when it can.

        ``base`` holds every parameter and buffer of the model, ``tracked`` the SWA mean of the
        tracked ones (model names, no sample dimension). The full forward runs under a perturbed
        copy of ``tracked`` (see :func:`_perturbed`), so that a body that reads the tracked weights
        shows even when the model holds the SWA mean. Then: the submodule must be called exactly
        once, the model's (extracted) output must be the submodule's output object, its call
        arguments must be those that :meth:`capture` gets with the model's own weights (they do not
        depend on the tracked weights), and running the submodule alone on them must give exactly
        the same values.
        """
        weights = {**base, **_perturbed(tracked)}
        calls: list[tuple[CallArguments, Any]] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            calls.append((CallArguments(tuple(args), dict(kwargs)), output))

        handle = self.submodule.register_forward_hook(hook, with_kwargs=True)
        try:
            full = extract(call_model(lambda *a, **k: functional_call(self.model, weights, a, k), inputs))
        finally:
            handle.remove()
        if len(calls) != 1:
            return f"{self.prefix!r} runs {len(calls)} times in one forward pass"
        arguments, output = calls[0]
        if not isinstance(full, Tensor) or full is not output:
            return f"the model's output is not the output of {self.prefix!r} (it is changed after it)"
        if not _same_values(arguments, self.capture(inputs)):
            return (
                f"the inputs of {self.prefix!r} depend on the tracked weights (or the forward pass is not "
                "deterministic)"
            )
        alone = functional_call(self.submodule, self.relative(weights), arguments.args, arguments.kwargs)
        if not isinstance(alone, Tensor) or alone.shape != full.shape or not torch.equal(alone, full):
            return f"running {self.prefix!r} alone does not reproduce the model's output"
        return None


def _perturbed(tracked: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tracked`` moved by a small deterministic amount (1% of ``1 + |w|``), never onto the model's
    own weights."""
    return {name: w + 0.01 * (1 + w.abs()) for name, w in tracked.items()}


def _same_values(a: Any, b: Any) -> bool:
    """Whether two call arguments (nested tuples, lists, dicts of tensors and plain values) are equal,
    tensors element for element."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are taken as different
        return False
