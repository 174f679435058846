"""``SWAGPredictionWriter``: save the Bayesian model averaging output of ``trainer.predict`` to disk."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_swag.likelihoods import PER_SAMPLE_KEYS, infer_task
from lightning_swag.predictive.batches import default_batch_inputs, default_batch_targets

__all__ = ["SWAGPredictionWriter", "load_predictions", "merge_predictions"]

#: Keys whose tensors have the sample axis first (``[S, B, ...]``): batches are joined along dim 1.


class SWAGPredictionWriter(BasePredictionWriter):
    """Write the predictions of :class:`~lightning_swag.SWAGModule` (``trainer.predict``) to files.

    File format: a dict of tensors saved with ``torch.save`` (``.pt``; load with
    ``torch.load(path)``) or ``numpy.savez`` (``.npz``; load with ``numpy.load(path)``, or with
    :func:`load_predictions` for either):

    * ``mean`` ``[N, ...]``: BMA mean (regression outputs, or class probabilities ``[N, C]``);
    * ``std`` ``[N, ...]``: standard deviation over the weight samples;
    * ``entropy`` ``[N]``, ``mutual_information`` ``[N]``: classification only;
    * ``samples`` ``[S, N, ...]``: per-sample outputs, when the module returns them;
    * ``targets`` ``[N, ...]``: ``batch[1]`` when every batch is a tuple/list of at least 2;
    * ``x`` ``[N, ...]``: the inputs, for regression when an input has at most ``max_input_numel``
      elements (e.g. the sine grid), or always/never with ``save_inputs=True``/``False``;
    * ``indices`` ``[N]``: dataset index of each row, when the dataloader reports them (a
      ``torch.utils.data.DataLoader``); under DDP :func:`merge_predictions` uses them to put the
      per-process files back in dataset order and drop the rows the sampler repeated as padding;
    * ``meta``: a dict (``.pt``) or a JSON string (``.npz``) with ``task``, ``predictive``
      (``"sampled"`` or ``"linearized"``), ``link_approx`` (the linearised predictive's, else
      ``None``), ``total_samples`` (weight samples per prediction: ``0`` for the linearised
      predictive with ``link_approx="probit"``, which draws none; files of 0.1 called it ``num_samples`` and still load),
      ``scale``, ``covariance``, ``seed``, ``global_rank``, ``world_size``, ``dataloader_idx``,
      ``num_rows``. Files written before ``predictive`` was recorded have no ``predictive`` or
      ``link_approx`` and load as they are.

    Rows of all batches are concatenated along dim 0 in prediction order. File names are
    ``<stem>[_dataloader<k>][_rank<r>][_batch<i>]<suffix>`` with ``filename = <stem><suffix>``:
    ``_dataloader<k>`` with several predict dataloaders, ``_rank<r>`` (the global rank) when
    ``world_size > 1`` (one file per process, each holding that process's share of the data),
    ``_batch<i>`` (6 digits) with ``write_interval="batch"`` (one file per batch instead of one per
    run, for outputs that do not fit in memory).

    Batches are read with the module's ``batch_inputs`` / ``batch_targets`` (``SWAGModule``'s override
    points), or with :mod:`lightning_swag.predictive.batches`' defaults for other modules.

    Args:
        output_dir: folder for the files (created if missing); ``None``:
            ``<trainer.default_root_dir>/predictions``.
        write_interval: ``"epoch"``: one file at the end of the run; ``"batch"``: one file per batch.
        filename: file name; its suffix picks the format, ``.pt`` or ``.npz``.
        save_inputs: store the inputs as ``x`` (``None``: for regression with small inputs).
        max_input_numel: largest per-row input size stored when ``save_inputs`` is ``None``.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        write_interval: Literal["batch", "epoch"] = "epoch",
        filename: str = "predictions.pt",
        save_inputs: bool | None = None,
        max_input_numel: int = 16,
    ) -> None:
        if write_interval not in ("batch", "epoch"):
            raise ValueError(f"write_interval must be 'batch' or 'epoch', got {write_interval!r}.")
        suffix = Path(filename).suffix
        if suffix not in (".pt", ".npz") or Path(filename).name != filename:
            raise ValueError(
                f"filename must be a plain file name ending in .pt or .npz (no folders), got {filename!r}."
            )
        if max_input_numel < 0:
            raise ValueError(f"max_input_numel must be >= 0, got {max_input_numel}.")
        # Batch-level hooks always run (targets and inputs are only visible there); the epoch file
        # is written from ``on_predict_epoch_end`` below.
        super().__init__("batch")
        self.output_dir = output_dir
        self.write_interval = write_interval
        self.filename = filename
        self.save_inputs = save_inputs
        self.max_input_numel = max_input_numel
        self.written: list[Path] = []
        self._records: dict[int, list[dict[str, Tensor]]] = {}

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._records = {}
        self.written = []

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Collect (``"epoch"``) or write (``"batch"``) one batch of predictions."""
        record = self._batch_record(pl_module, prediction, batch_indices, batch)
        if self.write_interval == "batch":
            self._save(trainer, pl_module, record, dataloader_idx, batch_idx)
        else:
            self._records.setdefault(dataloader_idx, []).append(record)

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.write_interval != "epoch":
            return
        for dataloader_idx, records in sorted(self._records.items()):
            self._save(trainer, pl_module, _concatenate(records), dataloader_idx)
        self._records = {}

    # ------------------------------------------------------------------ internals
    def _batch_record(
        self, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None, batch: Any
    ) -> dict[str, Tensor]:
        if not isinstance(prediction, dict):
            raise TypeError(
                "SWAGPredictionWriter expects predict_step to return a dict of tensors (as SWAGModule "
                f"does); got {type(prediction).__name__}."
            )
        record = {k: v.detach().cpu() for k, v in prediction.items() if isinstance(v, Tensor)}
        targets = _maybe(getattr(pl_module, "batch_targets", default_batch_targets), batch)
        if isinstance(targets, Tensor):
            record["targets"] = targets.detach().cpu()
        inputs = _maybe(getattr(pl_module, "batch_inputs", default_batch_inputs), batch)
        if isinstance(inputs, Tensor) and self._keep_inputs(pl_module, record, inputs):
            record["x"] = inputs.detach().cpu()
        if batch_indices:
            record["indices"] = torch.as_tensor(list(batch_indices), dtype=torch.long)
        return record

    def _keep_inputs(self, pl_module: L.LightningModule, record: dict[str, Tensor], inputs: Tensor) -> bool:
        if self.save_inputs is not None:
            return self.save_inputs
        per_row = inputs[0].numel() if inputs.ndim > 0 and len(inputs) else 0
        return infer_task(pl_module) == "regression" and per_row <= self.max_input_numel

    def _path(self, trainer: L.Trainer, dataloader_idx: int, batch_idx: int | None) -> Path:
        stem, suffix = os.path.splitext(self.filename)
        if len(trainer.num_predict_batches) > 1:
            stem += f"_dataloader{dataloader_idx}"
        if trainer.world_size > 1:
            stem += f"_rank{trainer.global_rank}"
        if batch_idx is not None:
            stem += f"_batch{batch_idx:06d}"
        output_dir = self.output_dir or os.path.join(trainer.default_root_dir, "predictions")
        return Path(output_dir) / f"{stem}{suffix}"

    def _save(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        record: dict[str, Tensor],
        dataloader_idx: int,
        batch_idx: int | None = None,
    ) -> None:
        path = self._path(trainer, dataloader_idx, batch_idx)
        path.parent.mkdir(parents=True, exist_ok=True)
        num_rows = int(record["mean"].shape[0]) if "mean" in record else 0
        predictive = getattr(pl_module, "predictive", None)
        meta: dict[str, Any] = {
            "task": infer_task(pl_module),
            "predictive": predictive,
            "link_approx": getattr(pl_module, "link_approx", None) if predictive == "linearized" else None,
            "total_samples": getattr(pl_module, "total_samples", None),
            "scale": getattr(pl_module, "scale", None),
            "covariance": getattr(pl_module, "covariance", None),
            "seed": getattr(pl_module, "seed", None),
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "dataloader_idx": dataloader_idx,
            "num_rows": num_rows,
        }
        if path.suffix == ".npz":
            import numpy as np

            arrays = {
                k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in record.items()
            }
            # numpy types **kwds as if one of them could be allow_pickle: bool
            np.savez(path, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        else:
            torch.save({**record, "meta": meta}, path)
        self.written.append(path)
        if batch_idx is None:
            rank_zero_info(f"SWAGPredictionWriter: wrote {num_rows} predictions to {path}")


def _maybe(extract: Callable[[Any], Any], batch: Any) -> Any:
    """``extract(batch)``, or None when the batch has no such part (e.g. no targets)."""
    try:
        return extract(batch)
    except (TypeError, KeyError, IndexError):
        return None


def _concatenate(records: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Join per-batch records; keys missing from any batch are dropped."""
    keys = [k for k in records[0] if all(k in r for r in records)]
    return {k: torch.cat([r[k] for r in records], dim=1 if k in PER_SAMPLE_KEYS else 0) for k in keys}


def load_predictions(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a file written by :class:`SWAGPredictionWriter` (``.pt`` or ``.npz``) as a dict of tensors
    (plus ``meta``, a dict)."""
    path = Path(path)
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as data:
            out: dict[str, Any] = {k: torch.from_numpy(data[k]) for k in data.files if k != "meta"}
            out["meta"] = json.loads(str(data["meta"])) if "meta" in data.files else {}
    else:
        out = torch.load(path, map_location="cpu", weights_only=True)
    meta = out.get("meta", {})
    if "num_samples" in meta and "total_samples" not in meta:  # written before the field was renamed
        meta["total_samples"] = meta.pop("num_samples")
    return out


def merge_predictions(sources: Sequence[str | os.PathLike[str] | dict[str, Any]]) -> dict[str, Any]:
    """Join the per-process files (or loaded dicts) of one DDP run into one dict.

    Rows are concatenated in the given order; when every part has ``indices``, they are sorted by
    dataset index and duplicates (``DistributedSampler`` pads the last processes' shares by repeating samples)
    are dropped. ``meta`` is the first part's, with ``num_rows`` updated.
    """
    parts = [load_predictions(s) if not isinstance(s, dict) else s for s in sources]
    if not parts:
        raise ValueError("merge_predictions needs at least one file.")
    merged: dict[str, Any] = _concatenate([{k: v for k, v in p.items() if k != "meta"} for p in parts])
    if "indices" in merged:
        unique, first = _first_occurrences(merged["indices"])
        merged = {k: v.index_select(1 if k in PER_SAMPLE_KEYS else 0, first) for k, v in merged.items()}
        merged["indices"] = unique
    row_key = next(k for k in merged if k not in PER_SAMPLE_KEYS)
    num_rows = int(merged[row_key].shape[0])
    merged["meta"] = {**parts[0].get("meta", {}), "num_rows": num_rows}
    return merged


def _first_occurrences(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of ``indices`` and the position of the first occurrence of each."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    positions = torch.arange(len(indices), device=indices.device)
    first = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return unique, first
