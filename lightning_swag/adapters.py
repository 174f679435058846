"""Adapters out: a posterior over peft adapter weights written as an ordinary peft adapter directory.

SWAG over LoRA adapters (``SWAGCallback(include="lora")``) gives a posterior over the ``lora_A``/
``lora_B`` matrices and the trained ``modules_to_save`` copies. :func:`export_adapter` writes one
point of it (the SWA mean, or one weight sample of a :class:`~lightning_swag.SWAGModule` run) where
tools that know nothing of SWAG load it: ``PeftModel.from_pretrained(base_model, directory)``, then
serve it or ``merge_and_unload()`` it. peft is imported only when this is called.

    from lightning_swag import export_adapter

    export_adapter(model, swag.posterior, "adapters/swa")              # the SWA mean
    export_adapter(model, swag.posterior, "adapters/s3", sample=3)     # SWAGModule's sample 3
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_swag.checks import check_int, check_scale, check_seed
from lightning_swag.posterior.noise import derive_seed
from lightning_swag.posterior.parameters import canonical_name, unwrap_model
from lightning_swag.posterior.protocol import Posterior, check_posterior
from lightning_swag.posterior.sharding import is_dtensor

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["export_adapter"]


def export_adapter(
    model: nn.Module,
    posterior: Posterior,
    directory: str | os.PathLike[str],
    *,
    sample: int | None = None,
    scale: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write the adapters of ``model`` at one point of ``posterior`` as a peft adapter directory.

    Args:
        model: the ``peft.PeftModel``, or a module holding exactly one (a LightningModule); the
            posterior's names may be relative to either. It is not modified: the adapter weights are
            replaced in a copy of its state dict only.
        posterior: a posterior over adapter weights (``swag.posterior`` of
            ``SWAGCallback(include="lora")``; ``posterior.diagonal()`` for SWAG-Diagonal). Every
            tracked tensor must be one that peft saves with the adapter (``lora_*``, the trained
            ``modules_to_save`` copies); untracked adapter tensors keep ``model``'s values.
        directory: where ``save_pretrained`` writes (``adapter_config.json``, the weights).
        sample: ``None`` for the SWA mean; ``i`` for the ``i``-th weight sample of
            ``SWAGModule(model, posterior, scale=scale, seed=seed)``, the same whatever its
            ``num_samples``.
        scale: covariance scale of the samples (ignored for the mean).
        seed: the run seed of the samples (ignored for the mean).

    Returns:
        ``directory`` as a ``Path``. Under DDP call it on every process (drawing a sample of a sharded
        posterior is a collective); global rank 0 writes.
    """
    peft_model, prefix = _peft_model_in(model)
    post = check_posterior(posterior)
    check_int("sample", sample, 0, allow_none=True, owner="export_adapter")
    scale = check_scale(scale, owner="export_adapter")
    check_seed(seed, allow_none=False, owner="export_adapter")
    state = peft_model.state_dict()
    keys = _state_keys(state, post.param_shapes, prefix)
    _check_saved_with_adapter(peft_model, state, keys)
    draw_dtype = (
        torch.float64 if any(state[k].dtype == torch.float64 for k in keys.values()) else torch.float32
    )
    index, scale = (0, 0.0) if sample is None else (sample, scale)
    weights = post.sample_weights(
        1, seed=derive_seed(seed, 0), first_sample=index, scale=scale, dtype=draw_dtype, device="cpu"
    )
    exported = dict(state)
    for name, key in keys.items():
        exported[key] = weights[name][0].to(dtype=state[key].dtype, device=state[key].device)
    path = Path(directory)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        peft_model.save_pretrained(str(path), state_dict=exported)
    return path


def _peft_model_in(model: nn.Module) -> tuple[PeftModel, str]:
    """The ``PeftModel`` that is ``model`` or the only one inside it, and its name prefix there."""
    try:
        from peft import PeftModel
    except ImportError as error:  # pragma: no cover - the lora extra is in dev
        raise ImportError(
            'export_adapter needs peft: pip install "lightning-swag[lora]" (or pip install peft).'
        ) from error
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"export_adapter: model must be an nn.Module holding a peft model, got a {type(model).__name__}."
        )
    model = unwrap_model(model)
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, PeftModel)]
    outermost = [(n, m) for n, m in found if not any(n.startswith(f"{o}.") for o, _ in found if o != n)]
    if len(outermost) != 1:
        what = (
            "no peft.PeftModel"
            if not outermost
            else f"{len(outermost)} peft models ({[n for n, _ in outermost]})"
        )
        raise ValueError(
            f"export_adapter: model ({type(model).__name__}) holds {what}; pass the PeftModel itself, or a module "
            "holding exactly one (peft.get_peft_model(base, LoraConfig(...)))."
        )
    name, peft_model = outermost[0]
    return peft_model, canonical_name(f"{name}.") if name else ""


def _state_keys(state: Mapping[str, Tensor], shapes: Mapping[str, torch.Size], prefix: str) -> dict[str, str]:
    """``{posterior name: key of the peft model's state dict}``. The posterior's names are relative to
    the peft model, or to a module holding it (any prefix, found from the names themselves)."""
    by_name = {canonical_name(key): key for key in state}
    if not shapes:
        raise ValueError("export_adapter: the posterior tracks no tensors.")
    first = next(iter(shapes))
    ends = [n for n in by_name if first == n or first.endswith(f".{n}")]
    outer = first[: len(first) - len(max(ends, key=len))] if ends else prefix
    keys: dict[str, str] = {}
    for name, shape in shapes.items():
        inner = name[len(outer) :] if name.startswith(outer) else None
        if inner not in by_name:
            raise ValueError(
                f"export_adapter: the posterior tracks {name!r}, which is not a tensor of the peft model "
                f"(looked for {inner or name!r} in its state dict). Pass the model the posterior was "
                "collected on, or the peft model inside it."
            )
        key = by_name[inner]
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(
                f"export_adapter: {name!r} has shape {tuple(shape)} in the posterior but "
                f"{tuple(state[key].shape)} in the model."
            )
        if is_dtensor(state[key]):
            raise ValueError(
                "export_adapter: the model's adapter weights are sharded (FSDP2); export from an unsharded "
                "copy of the model with a whole posterior (SWAGPosterior.load of the saved posterior)."
            )
        keys[name] = key
    return keys


def _check_saved_with_adapter(
    peft_model: PeftModel, state: Mapping[str, Tensor], keys: Mapping[str, str]
) -> None:
    """Every tracked tensor is one that ``save_pretrained`` writes: else the directory would silently
    lose part of the posterior (a base-model weight, say)."""
    from peft.utils import get_peft_model_state_dict

    saved: set[int] = set()
    for adapter in peft_model.peft_config:
        saved |= {
            id(t)
            for t in get_peft_model_state_dict(
                peft_model, state_dict=dict(state), adapter_name=adapter
            ).values()
        }
    lost = [name for name, key in keys.items() if id(state[key]) not in saved]
    if lost:
        raise ValueError(
            f"export_adapter: the posterior tracks {len(lost)} tensor(s) that a peft adapter directory does not "
            f"hold, e.g. {lost[0]!r}: an adapter holds only the lora_* tensors and the modules_to_save copies. "
            'Collect the posterior with SWAGCallback(include="lora") to export it as an adapter.'
        )
