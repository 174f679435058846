"""Subset posteriors: run the part of the network the posterior does not touch once per batch.

When every tracked parameter lives in one submodule (a head, the last block, a classifier) and that
submodule's output *is* the model's output, the rest of the network computes the same features for
every weight sample. :class:`SplitForward` then runs the model once per batch and keeps the
submodule's call arguments, and only the submodule runs under the weight samples.

Whether that is right can change from batch to batch, so it is checked on **every** batch, during
the one forward pass that captures the arguments (:meth:`SplitForward.capture`): the submodule must
run exactly once, the model's (extracted) output must be the submodule's output object, and neither
that output nor the submodule's tensor arguments may be changed in place after they were made
(their version counters must not move: an in-place ReLU or ``clamp_`` after the head, or a head
that changes its own inputs). A batch that fails runs the whole model under every sample instead.
What cannot change from batch to batch (the submodule's inputs do not depend on the tracked
weights, running it alone reproduces the model's output) is checked once, at the first batch, under
perturbed tracked weights (:meth:`SplitForward.verify`), on the batch's first
:data:`VERIFY_EXAMPLES` examples when the inputs can be cut (the whole batch otherwise), so that the
first batch costs little more than one forward pass.

:func:`find_split` proposes the submodule. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_swag.posterior.parameters import all_names, canonical_name
from lightning_swag.predictive.batches import (
    CallArguments,
    call_model,
    first_examples,
    without_inference_tensors,
)

__all__ = ["VERIFY_EXAMPLES", "SplitForward", "SplitUnavailable", "find_split"]

VERIFY_EXAMPLES = 2
"""The first batch's examples the once-per-model check of :meth:`SplitForward.verify` runs on."""


class SplitUnavailable(Exception):  # noqa: N818 - a reason to take the whole model, not an error
    """This batch (or this model) cannot take the split; the message says why."""


def _common_prefix(names: Sequence[str]) -> str:
    """The longest common module path of the modules owning ``names`` (``""`` when none)."""
    parts = [name.split(".")[:-1] for name in names]  # the owning modules
    prefix: list[str] = []
    for segments in zip(*parts, strict=False):
        if len(set(segments)) != 1:
            break
        prefix.append(segments[0])
    return ".".join(prefix)


def find_split(
    model: nn.Module, tracked: Sequence[str], extract: Callable[[Any], Any] | None = None
) -> SplitForward | None:
    """The smallest submodule that owns every tracked parameter (names inside ``model``), when it is
    not the model itself and no tracked tensor is shared with a module outside it (weight tying).
    ``extract`` maps the model's raw output to the tensor that is averaged (default: as it is)."""
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
    return SplitForward(model, prefix, submodule, extract)


class _CallRecord:
    """What the hooks on the submodule see during one forward pass of the model."""

    def __init__(self) -> None:
        self.calls = 0
        self.arguments = CallArguments((), {})
        self.versions: list[int] = []
        self.output: Any = None
        self.output_version = -1

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        self.arguments = CallArguments(tuple(args), dict(kwargs))
        self.versions = _versions(self.arguments)

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.output = output
        self.output_version = output._version if isinstance(output, Tensor) else -1

    def arguments_for(self, full: Any, prefix: str) -> CallArguments:
        """The captured arguments when the model's output ``full`` is the submodule's, untouched."""
        if self.calls != 1:
            raise SplitUnavailable(f"{prefix!r} runs {self.calls} times in one forward pass")
        if not isinstance(full, Tensor) or full is not self.output:
            raise SplitUnavailable(
                f"the model's output is not the output of {prefix!r}: later code computes it from that "
                "output, or wraps or unpacks it (the tracked weights sit before the end of the network)"
            )
        if full._version != self.output_version:
            raise SplitUnavailable(f"the output of {prefix!r} is changed in place after it runs")
        if _versions(self.arguments) != self.versions:
            raise SplitUnavailable(f"the inputs of {prefix!r} are changed in place during or after it")
        return self.arguments


class SplitForward:
    """The model cut at ``submodule`` (see the module docstring).

    Args:
        model: the whole network.
        prefix: the submodule's name inside ``model``.
        submodule: ``model.get_submodule(prefix)``.
        extract: maps the model's raw output to the tensor that is averaged (default: as it is).
    """

    def __init__(
        self, model: nn.Module, prefix: str, submodule: nn.Module, extract: Callable[[Any], Any] | None = None
    ) -> None:
        self.model = model
        self.prefix = prefix
        self.submodule = submodule
        self.extract = extract

    def relative(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` named inside the submodule (the model's names without the prefix); others dropped."""
        start = len(self.prefix) + 1
        return {name[start:]: value for name, value in tensors.items() if name.startswith(self.prefix + ".")}

    def capture(self, inputs: Any, weights: Mapping[str, Tensor] | None = None) -> CallArguments:
        """Run the whole model once on ``inputs`` (under ``weights``, all its tensors by name, or its
        own) and return the submodule's call arguments; :class:`SplitUnavailable` when this batch
        cannot take the split (see the module docstring).

        The pass runs outside inference mode (inference tensors have no version counter; inputs that
        are inference tensors are copied) and without gradients. Buffers passed in ``weights`` are
        the ones a train-mode BatchNorm updates, never the model's own.
        """
        return self._run(inputs, weights)[0]

    def _run(self, inputs: Any, weights: Mapping[str, Tensor] | None) -> tuple[CallArguments, Tensor]:
        """:meth:`capture`'s pass: the submodule's arguments and the model's output (its output)."""
        record = _CallRecord()
        pre = self.submodule.register_forward_pre_hook(record.before, with_kwargs=True)
        post = self.submodule.register_forward_hook(record.after, with_kwargs=True)
        try:
            with torch.inference_mode(False), torch.no_grad():
                normal = without_inference_tensors(inputs)
                if weights is None:
                    raw = call_model(self.model, normal)
                else:
                    raw = call_model(lambda *a, **k: functional_call(self.model, dict(weights), a, k), normal)
                full = self.extract(raw) if self.extract is not None else raw
        finally:
            pre.remove()
            post.remove()
        return record.arguments_for(full, self.prefix), full

    def verify(
        self, inputs: Any, base: Mapping[str, Tensor], tracked: Mapping[str, Tensor]
    ) -> tuple[str | None, CallArguments | None]:
        """Why the split path cannot replace the full one for this model (``None`` when it can), and
        the submodule's arguments on ``inputs`` with the model's own weights (``None`` when refused),
        which the first batch then uses.

        ``base`` holds every parameter and buffer of the model, ``tracked`` the SWA mean of the
        tracked ones (model names, no sample dimension). On the batch's first :data:`VERIFY_EXAMPLES`
        examples (every tensor whose first dimension is the first input tensor's cut; the whole
        batch when none is, when that is not the output's batch size, or when the cut inputs fail to
        run) the model runs first with its own weights: a split the model's structure refuses (the
        model's output is not the submodule's, the submodule runs twice) is refused there, for the
        cost of those examples. Then the whole batch runs once with the model's own weights (the
        per-batch checks of :meth:`capture`, and the arguments kept), and the first examples, or
        the batch, run under a perturbed copy of ``tracked`` (see
        :func:`_perturbed`), so that a body that reads the tracked weights shows even when the model
        holds the SWA mean: the submodule's arguments must be the same in both (they do not depend
        on the tracked weights), and the submodule run alone on them must give exactly the model's
        output.
        """
        weights = {**base, **_perturbed(tracked)}
        size = _leading_size(inputs)
        few = first_examples(inputs, size, VERIFY_EXAMPLES) if size > VERIFY_EXAMPLES else None
        reference: CallArguments | None = None
        if few is not None:  # what the model's structure refuses shows on two examples: cheaply
            try:
                reference = self._run(few, None)[0]
            except SplitUnavailable as why:
                return str(why), None
            except Exception:  # noqa: BLE001 - a model that cannot run on part of the batch: check it whole
                few = None
        try:
            own, full = self._run(inputs, None)
        except SplitUnavailable as why:
            return str(why), None
        if few is not None and full.shape[0] != size:  # the cut was not along the output's batch
            few = None
        if few is not None:
            try:
                perturbed = self._run(few, weights)
            except Exception:  # noqa: BLE001 - as above
                few = None
        if few is None or reference is None:
            try:
                reference, perturbed = own, self._run(inputs, weights)
            except SplitUnavailable as why:
                return str(why), None
        reason = self._independent(reference, *perturbed, weights)
        return (reason, None) if reason is not None else (None, own)

    def _independent(
        self, own: CallArguments, arguments: CallArguments, full: Tensor, weights: Mapping[str, Tensor]
    ) -> str | None:
        """Why the submodule's ``arguments`` under the perturbed ``weights`` (the model's output
        ``full``) show that the split is wrong, against ``own``, those of the model's own weights."""
        if not _same_values(arguments, own):
            return (
                f"the inputs of {self.prefix!r} depend on the tracked weights (or the forward pass is not "
                "deterministic)"
            )
        with torch.inference_mode(False), torch.no_grad():
            alone = functional_call(self.submodule, self.relative(weights), arguments.args, arguments.kwargs)
        if not isinstance(alone, Tensor) or alone.shape != full.shape or not torch.equal(alone, full):
            return f"running {self.prefix!r} alone does not reproduce the model's output"
        return None


def _leading_size(inputs: Any) -> int:
    """The first dimension of the first tensor in ``inputs`` (its batch size, when it leads), or 0."""
    first = next(_tensors(inputs), None)
    return first.shape[0] if first is not None and first.dim() > 0 else 0


def _perturbed(tracked: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tracked`` moved by a small deterministic amount (1% of ``1 + |w|``), never onto the model's
    own weights."""
    return {name: w + 0.01 * (1 + w.abs()) for name, w in tracked.items()}


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors inside nested tuples, lists and mappings, in order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


def _versions(arguments: CallArguments) -> list[int]:
    return [t._version for t in _tensors((arguments.args, arguments.kwargs))]


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
