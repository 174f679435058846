"""Two-process (gloo, CPU) runs of sharded SWAG for ``test_sharded.py``: DDP with
``SWAGCallback(shard=True)``, then FSDP2 (``fully_shard``) under ``ModelParallelStrategy``, in the
same two processes (one launch keeps the test short).

Usage::

    python tests/sharded_script.py OUT_DIR

Lightning's ``strategy="ddp"`` re-runs this script for rank 1. For each ``KIND`` (``ddp``,
``fsdp2``) the processes:

1. train ``Wide`` for ``MAX_EPOCHS`` epochs with SWAG from ``START_EPOCH`` on, writing a checkpoint
   after ``CKPT_EPOCHS`` epochs, while a recorder keeps the whole weights of every collected epoch
   (``{KIND}_fit_rank{r}.pt``, with ``nbytes`` and the local ranges); ``posterior.save`` on every
   process writes ``{KIND}_posterior.pt``;
2. resume from that checkpoint in a new Trainer, model and callback, to ``MAX_EPOCHS``:
   ``{KIND}_posterior_resumed.pt`` and ``{KIND}_resumed_rank{r}.pt`` (the weights);
3. draw samples with ``sample_local`` and join them (``{KIND}_samples_rank{r}.pt``), and the
   covariance of ``COV_SAMPLES`` samples over ``cov_columns`` (``{KIND}_cov.pt``, rank 0);
4. predict with ``SWAGModule`` under the same strategy (``{KIND}_pred_{tag}_rank{r}.pt``): ``s05``
   (scale 0.5, seeded; DDP: then ``ddp_bma.ckpt``), ``s0`` (scale 0), ``file`` (as ``s05``, with the
   unsharded posterior read from the one file) and ``uneven`` (17 inputs: 2 batches on rank 0, 1 on rank 1;
   no seed; for DDP with the sample cache off, so that every batch gathers).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_swag.predictive.weights as swag_weights
from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior
from lightning_swag.posterior.sharding import all_gather_columns, gather_columns, reshard_fsdp

START_EPOCH, MAX_EPOCHS, CKPT_EPOCHS, MAX_RANK = 1, 5, 3, 3
SEED, NUM_SAMPLES, CHUNK = 11, 6, 4
COV_SAMPLES, COV_CHUNK = 20_000, 2_000
QUIET = {
    "accelerator": "cpu",
    "devices": 2,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class Wide(L.LightningModule):
    """4 → 33 → 31 → 1 MLP (1251 weights). Sharded with ``fsdp=True``: the first two Linears get their
    own FSDP2 groups and the root owns the last one. Shards are uneven (33 rows: 17 / 16) and the
    (1, 31) output weight is empty on rank 1."""

    def __init__(self, fsdp: bool = False) -> None:
        super().__init__()
        self.fsdp = fsdp
        self.net = nn.Sequential(nn.Linear(4, 33), nn.Tanh(), nn.Linear(33, 31), nn.Tanh(), nn.Linear(31, 1))

    def configure_model(self) -> None:
        if not self.fsdp or any(type(p).__name__ == "DTensor" for p in self.parameters()):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def predict_inputs(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(5))


def predict_loader(n: int = 40) -> DataLoader:
    return DataLoader(predict_inputs(n), batch_size=8, shuffle=False)


def cov_columns(num_params: int) -> list[int]:
    """Columns for the covariance check: every 9th, plus both sides of every shard edge of 2 processes
    (the ranges recorded by the runs are checked against them in the test)."""
    return sorted(set(range(0, num_params, 9)) | {0, 67, 68, 131, 132, 625, 626, 1249, 1250})


def strategy(kind: str):
    return "ddp" if kind == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


class Recorder(L.Callback):
    """The whole trainable weights at the end of every collected epoch, recorded independently of SWAG
    (under FSDP2 with ``full_tensor()``, a collective)."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= START_EPOCH:
            reshard_fsdp(pl_module)
            parts = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in pl_module.parameters()]
            self.snapshots.append(torch.cat([p.detach().reshape(-1).double() for p in parts]))


class Writer(BasePredictionWriter):
    def __init__(self, path: Path) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        torch.save(
            {
                "predictions": predictions,
                "batch_indices": batch_indices,
                "run_seed": pl_module.engine.current_seed(),
            },
            self.path,
        )


def local_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    reshard_fsdp(model)
    return {
        n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def run(kind: str, out: Path) -> None:
    ckpt_dir = out / f"{kind}_ckpt"
    L.seed_everything(0, verbose=False)
    model = Wide(fsdp=kind == "fsdp2")
    swag = SWAGCallback(start_epoch=START_EPOCH, max_rank=MAX_RANK, shard=True)
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="mid", every_n_epochs=CKPT_EPOCHS)
    trainer = L.Trainer(
        max_epochs=MAX_EPOCHS, strategy=strategy(kind), callbacks=[swag, recorder, checkpoint], **QUIET
    )
    trainer.fit(model, loader(64, 0), loader(16, 1), weights_only=False)
    rank = trainer.global_rank
    post = swag.posterior
    post.save(out / f"{kind}_posterior.pt")
    torch.save(
        {
            "snapshots": recorder.snapshots,
            "nbytes": post.nbytes,
            "is_sharded": post.is_sharded,
            "ranges": post.local_ranges,
            "weights": local_weights(model),
            "local_tensor_bytes": sum(
                t.numel() * t.element_size()
                for t in (
                    post.statistics.mean,
                    post.statistics.sum_sq_dev,
                    post.statistics.scratch,
                    post.statistics.deviations,
                )
            ),
        },
        out / f"{kind}_fit_rank{rank}.pt",
    )

    # resume in a new Trainer, model (other initial weights) and callback; the same global seed, which
    # Lightning's DistributedSampler takes for its order
    L.seed_everything(0, verbose=False)
    torch.manual_seed(123)
    resumed_model = Wide(fsdp=kind == "fsdp2")
    resumed_swag = SWAGCallback(start_epoch=START_EPOCH, max_rank=MAX_RANK, shard=True)
    resumer = L.Trainer(
        max_epochs=MAX_EPOCHS,
        strategy=strategy(kind),
        callbacks=[resumed_swag],
        enable_checkpointing=False,
        **QUIET,
    )
    ckpt_path = ckpt_dir / "mid.ckpt"
    resumer.fit(resumed_model, loader(64, 0), loader(16, 1), ckpt_path=ckpt_path, weights_only=False)
    resumed_swag.posterior.save(out / f"{kind}_posterior_resumed.pt")
    torch.save({"weights": local_weights(resumed_model)}, out / f"{kind}_resumed_rank{rank}.pt")

    # samples: this process's columns, joined; chunked 4 + 2
    parts = [
        post.sample_local(n, 0.5, seed=SEED, first_sample=s, dtype=torch.float64) for s, n in ((0, 4), (4, 2))
    ]
    joined = torch.cat([all_gather_columns(part, post.layout) for part in parts])
    torch.save({"samples": joined}, out / f"{kind}_samples_rank{rank}.pt")
    columns = cov_columns(post.num_params)
    total = torch.zeros(len(columns), dtype=torch.float64)
    products = torch.zeros(len(columns), len(columns), dtype=torch.float64)
    for start in range(0, COV_SAMPLES, COV_CHUNK):
        local = post.sample_local(COV_CHUNK, 1.0, seed=SEED + 1, first_sample=start, dtype=torch.float64)
        whole = gather_columns(local, post.layout)
        if whole is not None:
            chosen = whole[:, columns]
            total += chosen.sum(0)
            products += chosen.T @ chosen
    if rank == 0:
        mean = total / COV_SAMPLES
        cov = (products - COV_SAMPLES * torch.outer(mean, mean)) / (COV_SAMPLES - 1)
        torch.save({"columns": columns, "mean": mean, "cov": cov}, out / f"{kind}_cov.pt")

    # BMA under the same strategy; "file": the unsharded posterior read from the one file, which
    # SWAGModule shards for the FSDP2 model (DDP: the ordinary unsharded prediction)
    one_file = SWAGPosterior.load(out / f"{kind}_posterior.pt")
    for tag, scale, posterior in (("s05", 0.5, post), ("s0", 0.0, post), ("file", 0.5, one_file)):
        bma = SWAGModule(model, posterior, num_samples=NUM_SAMPLES, scale=scale, seed=SEED, chunk_size=CHUNK)
        predictor = L.Trainer(
            strategy=strategy(kind), callbacks=[Writer(out / f"{kind}_pred_{tag}_rank{rank}.pt")], **QUIET
        )
        predictor.predict(bma, predict_loader(), return_predictions=False)
        if kind == "ddp" and tag == "s05":  # a SWAGModule checkpoint gathers its sharded posterior
            predictor.save_checkpoint(out / "ddp_bma.ckpt")
    torch.manual_seed(1000 + rank)  # different global RNGs: agreeing on the seed is no accident
    cache = swag_weights.CACHE_BYTES
    swag_weights.CACHE_BYTES = 0  # DDP: gather the samples in every batch
    try:
        bma = SWAGModule(model, post, num_samples=NUM_SAMPLES, scale=0.5, chunk_size=CHUNK)
        L.Trainer(
            strategy=strategy(kind), callbacks=[Writer(out / f"{kind}_pred_uneven_rank{rank}.pt")], **QUIET
        ).predict(bma, predict_loader(17), return_predictions=False)
    finally:
        swag_weights.CACHE_BYTES = cache
    torch.save({"weights": local_weights(model)}, out / f"{kind}_after_predict_rank{rank}.pt")


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for kind in ("ddp", "fsdp2"):
        run(kind, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
