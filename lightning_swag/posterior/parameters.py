"""Which parameters a posterior tracks, and the names it knows them by. Plain torch.

Names are *canonical*: the segments that wrappers insert between a module and its parameters
(``torch.compile``'s ``_orig_mod``, FSDP1, activation checkpointing) are removed, so a posterior
collected from a compiled model applies to the plain one. A tensor shared by several modules (weight
tying) has several names; it is tracked once, under the name ``named_parameters()`` gives it first,
and an ``include`` pattern matches it through any of its names.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

import torch
from torch import Tensor, nn

__all__ = [
    "INCLUDE_PRESETS",
    "all_names",
    "canonical_name",
    "check_include",
    "check_include_matches",
    "check_compatible",
    "named_tracked",
    "select_parameters",
    "unwrap_model",
]

_WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

INCLUDE_PRESETS: dict[str, tuple[str, ...] | None] = {
    "trainable": None,
    "lora": ("*lora_*", "*modules_to_save.*"),
}
"""Names for common ``include`` choices: ``"trainable"`` (every parameter with
``requires_grad=True``, the default) and ``"lora"`` (peft adapter weights, ``lora_A``/``lora_B``/
``lora_embedding_*``/``lora_magnitude_vector``, plus the trained copies of ``modules_to_save``)."""


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert (``net._orig_mod.0.weight`` -> ``net.0.weight``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` / ``DistributedDataParallel`` / ``DataParallel`` wrapper holds
    (repeatedly), or ``model`` itself. The wrapper shares its parameters with the inner module."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def named_tracked(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{canonical name: parameter}`` of every parameter of ``model`` (wrappers unwrapped; a shared
    tensor once, under its first name)."""
    return {canonical_name(n): p for n, p in unwrap_model(model).named_parameters()}


def all_names(model: nn.Module) -> dict[str, list[str]]:
    """``{first canonical name: every canonical name}`` of each parameter (several for tied weights)."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, param in unwrap_model(model).named_parameters(remove_duplicate=False):
        canonical = canonical_name(name)
        key = first.setdefault(id(param), canonical)
        names.setdefault(key, []).append(canonical)
    return names


def _patterns(include: Sequence[str] | str | None, owner: str | None = None) -> tuple[str, ...] | None:
    if isinstance(include, str) and include in INCLUDE_PRESETS:
        return INCLUDE_PRESETS[include]
    if include is None:
        return None
    listed = isinstance(include, (Sequence, AbstractSet))
    patterns = (include,) if isinstance(include, str) else tuple(include) if listed else ()
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        prefix = f"{owner}: " if owner else ""
        raise ValueError(
            f"{prefix}include must be a preset ({', '.join(map(repr, INCLUDE_PRESETS))}), a parameter name or "
            f"pattern (e.g. 'head.*'), a non-empty list of them, or None; got {include!r} "
            f"(a {type(include).__name__})."
        )
    return patterns


def check_include(include: Sequence[str] | str | None, owner: str | None = None) -> list[str] | str | None:
    """``include`` as kept (a preset or pattern string, a list of patterns, or ``None``); a
    ``ValueError`` saying what is accepted unless it is a valid selection (checked without a model,
    e.g. when ``SWAGCallback`` is built)."""
    patterns = _patterns(include, owner)
    return include if include is None or isinstance(include, str) else list(patterns or ())


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".") for name in names for pat in patterns
    )


def check_include_matches(
    model: nn.Module, include: Sequence[str] | str | None, owner: str | None = None
) -> None:
    """Raise a ``ValueError`` listing some of ``model``'s parameter names when ``include`` matches none
    of them (trainable or not: a frozen backbone may be unfrozen before the first snapshot), so that a
    typo is reported when fit starts, not at the first snapshot after the pre-training epochs."""
    patterns = _patterns(include, owner)
    aliases = all_names(model)
    if patterns is None or any(_matches(names, patterns) for names in aliases.values()):
        return
    prefix = f"{owner}: " if owner else ""
    some = ", ".join(list(aliases)[:10]) or "(none)"
    raise ValueError(
        f"{prefix}include={include!r} matches no parameter of {type(model).__name__}. Give names or shell "
        f"patterns of its parameters (or module names), e.g. 'head.*'; some names are: {some}."
    )


def select_parameters(
    model: nn.Module, include: Sequence[str] | str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The ``(canonical name, parameter)`` pairs SWAG tracks, in ``model.parameters()`` order.

    Args:
        model: the network.
        include: ``None`` or ``"trainable"`` tracks every parameter with ``requires_grad=True``;
            ``"lora"`` the peft adapters and ``modules_to_save`` copies (see
            :data:`INCLUDE_PRESETS`); otherwise names or shell-style patterns (``"head.*"``,
            ``"*.weight"``) matched against every name of a parameter (a tied weight matches
            through any of its owners); a module name (``"classifier"``) selects all of its
            parameters. Only trainable parameters are ever tracked.

    Raises:
        ValueError: nothing matches, or nothing is trainable.
    """
    patterns = _patterns(include)
    tracked = named_tracked(model)
    aliases = all_names(model)
    named = [(n, p) for n, p in tracked.items() if p.requires_grad]
    if patterns is not None:
        selected = [(n, p) for n, p in named if _matches(aliases.get(n, [n]), patterns)]
        if not selected and named:
            available = ", ".join(n for n, _ in named[:10])
            raise ValueError(
                f"include={include!r} matches no trainable parameter of {type(model).__name__}. "
                f"Some names are: {available}."
            )
        named = selected
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True to track.")
    return named


def check_compatible(param_shapes: Mapping[str, torch.Size], model: nn.Module) -> None:
    """Raise a ``ValueError`` that names the missing or mis-shaped parameters when ``model`` does not
    have the named parameters ``param_shapes`` (a posterior's)."""
    named = named_tracked(model)
    missing = [n for n in param_shapes if n not in named]
    wrong = [
        f"{n}: model {tuple(named[n].shape)} vs posterior {tuple(s)}"
        for n, s in param_shapes.items()
        if n in named and named[n].shape != s
    ]
    if missing or wrong:
        model_params = sum(p.numel() for p in model.parameters())
        num_params = sum(math.prod(s) for s in param_shapes.values())
        details = []
        if missing:
            details.append(f"missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if wrong:
            details.append(f"shape mismatches {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise ValueError(
            f"The posterior ({num_params} weights in {len(param_shapes)} tensors) does not match "
            f"{type(model).__name__} ({model_params} weights): {'; '.join(details)}. "
            + _prefix_hint(param_shapes, named)
        )


def _prefix_hint(param_shapes: Mapping[str, torch.Size], named: Mapping[str, Tensor]) -> str:
    """How to fix a mismatch: when the names differ only by a common prefix (a posterior collected on
    a wrapper applied to the module it wraps, or the other way round), which module to pass."""
    first = next(iter(param_shapes))
    shapes = {n: p.shape for n, p in named.items()}
    for name in named:
        if first.endswith("." + name):  # the posterior's names carry a prefix the model's lack
            prefix = first[: -len(name)]
            if all(
                n.startswith(prefix) and shapes.get(n[len(prefix) :]) == s for n, s in param_shapes.items()
            ):
                return (
                    f"Its names are this model's with the prefix {prefix!r} (its {first!r} is "
                    f"{first[len(prefix) :]!r} here): it was collected on a module that holds this one as "
                    f"`{prefix[:-1]}`. Pass that outer module as model (e.g. the LightningModule SWAGCallback "
                    "trained), not its submodule."
                )
        if name.endswith("." + first):  # the model's names carry a prefix the posterior's lack
            prefix = name[: -len(first)]
            if all(shapes.get(prefix + n) == s for n, s in param_shapes.items()):
                return (
                    f"This model's names are the posterior's with the prefix {prefix!r} (its {first!r} is "
                    f"{name!r} here): it was collected on the submodule `{prefix[:-1]}`. Pass "
                    f"that submodule as model (model.{prefix[:-1]}), not the module that holds it."
                )
    return "Use the posterior collected from this architecture."
