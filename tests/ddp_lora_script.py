"""Two-process DDP (gloo, CPU) run of sharded SWAG over LoRA adapters, for ``test_distributed_lora.py``.

Usage::

    python tests/ddp_lora_script.py OUT_DIR

A tiny BERT classifier built from a config (no download) gets a peft LoRA adapter on ``query`` and
``value`` with a trained copy of the classifier (``modules_to_save``), inside a LightningModule fed
mapping batches (``input_ids``, ``attention_mask``, ``labels``). It is trained with
``SWAGCallback(include="lora", shard=True)`` under ``strategy="ddp"`` (Lightning re-runs this script
for rank 1). Each process writes:

* ``fit_rank{r}.pt``: the adapter tensors it recorded itself at the end of every collected epoch (the
  weights of SWAG's last-batch snapshot: every parameter whose name holds ``lora_`` or
  ``modules_to_save.``, in ``named_parameters`` order, flattened in float64), their names, its own part
  of the sharded posterior (``mean``, ``variance``, ``deviations``, the ``local_ranges`` and ``nbytes``),
  the trained ``state_dict`` and the data indices it trained on;
* ``bma_rank{r}.pt``: a seeded ``BMA`` with the sharded posterior, on every process, on the same inputs.

Every process then calls ``posterior.save``, the documented way to get one file of the whole sharded
posterior (gathered to rank 0): ``posterior.pt``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from ddp_train_script import QUIET
from tiny_lora import LABELS, VOCAB, lora_model
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_swag import BMA, SWAGCallback

SEQ = 9
START_EPOCH, MAX_EPOCHS, MAX_RANK = 1, 5, 3
NUM_SAMPLES, SEED = 6, 7
TRAIN_ROWS, BATCH_SIZE = 32, 4


class LoraClassifier(L.LightningModule):
    """The peft model in a LightningModule, as users write it (mapping batches, ``.logits``)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = lora_model(move_lora_b=True)
        self.seen: dict[int, list[int]] = {}  # epoch -> data indices this process trained on

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=0.3, momentum=0.9)


def rows(n: int, seed: int) -> list[dict[str, Tensor]]:
    """Padded token sequences with labels that depend on the tokens, and each row's index."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    for i in range(n):
        mask[i, 5 + i % 4 :] = 0
    labels = (ids[:, 0] % LABELS).long()
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i], "index": torch.tensor(i)}
        for i in range(n)
    ]


def train_loader() -> DataLoader:
    return DataLoader(rows(TRAIN_ROWS, seed=0), batch_size=BATCH_SIZE, shuffle=False)


def predict_inputs() -> dict[str, Tensor]:
    """Ten held-out rows as one batch of model inputs (no labels)."""
    held_out = rows(10, seed=9)
    return {k: torch.stack([r[k] for r in held_out]) for k in ("input_ids", "attention_mask")}


def adapter_names(module: nn.Module) -> list[str]:
    """The adapter tensors, found independently of the package's ``include="lora"`` preset."""
    return [n for n, p in module.named_parameters() if "lora_" in n or "modules_to_save." in n]


class AdapterRecorder(L.Callback):
    """The adapter tensors at the end of every collected epoch, recorded independently of SWAG."""

    def __init__(self) -> None:
        self.snapshots: list[Tensor] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= START_EPOCH:
            params = dict(pl_module.named_parameters())
            flat = torch.cat([params[n].detach().reshape(-1) for n in adapter_names(pl_module)])
            self.snapshots.append(flat.double().clone())


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = LoraClassifier()
    swag = SWAGCallback(include="lora", start_epoch=START_EPOCH, max_rank=MAX_RANK, shard=True)
    recorder = AdapterRecorder()
    trainer = L.Trainer(max_epochs=MAX_EPOCHS, callbacks=[swag, recorder], **QUIET)
    trainer.fit(module, train_dataloaders=train_loader())
    rank = trainer.global_rank
    post = swag.posterior
    torch.save(
        {
            "world_size": trainer.world_size,
            "snapshots": recorder.snapshots,
            "names": adapter_names(module),
            "tracked": list(post.param_shapes),
            "is_sharded": post.is_sharded,
            "ranges": post.local_ranges,
            "nbytes": post.nbytes,
            "mean": post.mean.clone(),
            "variance": post.variance.clone(),
            "deviations": post.deviations.clone(),
            "state_dict": module.state_dict(),
            "seen": module.seen,
        },
        out / f"fit_rank{rank}.pt",
    )
    # a BMA with the sharded posterior, on every process (the samples' columns are gathered)
    bma = BMA(module, post, num_samples=NUM_SAMPLES, task="classification", seed=SEED)
    torch.save({"mean": bma(predict_inputs())["mean"]}, out / f"bma_rank{rank}.pt")
    post.save(out / "posterior.pt")  # on every process: one file of the whole posterior
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
