"""Per-process memory of a sharded SWAG posterior: measured on CPU at world size 1 and 2, and the
same formula on paper for 8–64 GPUs and 1B–70B parameters.

Measured: ``W`` processes (gloo on this machine, ``torch.multiprocessing.spawn``) each build a model
of ``--params`` weights (an MLP of equal square layers), then, with the peak resident set reset
before each phase (``VmHWM`` through ``/proc/self/clear_refs``, Linux):

* ``collect``: ``SWAGPosterior.from_model(model, K, shard=True)`` and ``--snapshots`` collections
  (weights perturbed in place between them): the statistics this process keeps;
* ``save``: ``posterior.save(path)`` on every process (a collective: rank 0 gathers the parts row
  by row and writes the whole posterior, so it holds it all while writing);
* ``sample``: ``posterior.sample_local(--chunk)`` (this process's columns of a chunk of samples).

Kinds: ``unsharded`` (world 1, today's posterior), ``ddp`` (world 2, ``shard=True``: a slice of the
flat vector; every process holds the whole model) and ``fsdp2`` (world 2, the model sharded with
``fully_shard``; the posterior keeps each process's rows).

Formula (bytes per process; ``P`` weights, rank ``K``, ``W`` processes): the posterior keeps
``3·8·P/W`` (float64 mean, sum of squared deviations and scratch) plus ``K·4·P/W`` (float32
deviations); a chunk of ``S`` float64 local samples takes ``8·S·P/W``.

Usage::

    python benchmarks/sharded_memory.py [--params 4000000] [--rank 10] [--snapshots 12] [--chunk 4]
                                        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_swag import SWAGPosterior

MiB = 2**20
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
MOMENT_BYTES, DEVIATION_BYTES = 8, 4  # SWAGPosterior's defaults: float64 moments, float32 deviations


def posterior_bytes(num_params: float, rank: int, world_size: int) -> float:
    """The formula: bytes of the statistics one process keeps."""
    return (3 * MOMENT_BYTES + rank * DEVIATION_BYTES) * num_params / world_size


def _peak_reset() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS and return it (bytes)."""
    _CLEAR_REFS.write_text("5")
    return _peak()


def _peak() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model_of(num_params: int) -> nn.Module:
    """An MLP of square bias-free layers with about ``num_params`` weights (4 layers)."""
    width = int(math.sqrt(num_params / 4))
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(4)])


def _worker(
    rank: int, world: int, kind: str, port: int, args: argparse.Namespace, out: str, queue: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = model_of(args.params)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    step = [torch.randn_like(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters()]
    dist.barrier()

    start = _peak_reset()
    post = SWAGPosterior.from_model(model, args.rank, shard=True)
    with torch.no_grad():
        for _ in range(args.snapshots):  # > rank: every deviation row is written, no untouched pages left
            for p, d in zip(model.parameters(), step, strict=True):
                (p.to_local() if hasattr(p, "to_local") else p).add_(d, alpha=0.01)
            post.collect(model)
    collect = _peak() - start

    start = _peak_reset()
    post.save(out)
    save = _peak() - start

    start = _peak_reset()
    samples = post.sample_local(args.chunk, seed=0)
    sample = _peak() - start
    del samples
    queue.put(
        {
            "kind": kind,
            "world": world,
            "rank": rank,
            "num_params": post.num_params,
            "local_params": post.num_local_params,
            "nbytes": post.nbytes,
            "collect": collect,
            "save": save,
            "sample": sample,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, world in (("unsharded", 1), ("ddp", 2), ("fsdp2", 2)):
            path = os.path.join(tmp, f"{kind}.pt")
            mp.spawn(_worker, args=(world, kind, _free_port(), args, path, queue), nprocs=world, join=True)
            found = [queue.get() for _ in range(world)]
            for row in found:
                row["file"] = os.path.getsize(path)
            rows += sorted(found, key=lambda r: r["rank"])
    return rows


def paper_table(rank: int = 20) -> list[tuple[str, list[float]]]:
    """Per-process posterior bytes for 1B–70B weights over 1 and 8–64 processes (the formula)."""
    return [
        (name, [posterior_bytes(p, rank, w) for w in (1, 8, 16, 32, 64)])
        for name, p in (("1B", 1e9), ("7B", 7e9), ("13B", 13e9), ("70B", 70e9))
    ]


def _gb(value: float) -> str:
    return f"{value / 1e12:.2f} TB" if value >= 1e12 else f"{value / 1e9:.3g} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--snapshots", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not _STATUS.is_file():
        sys.exit("This benchmark reads the peak RSS from /proc (Linux).")

    from lightning_swag.experiments.machine import machine_description

    rows = measure(args)
    p = rows[0]["num_params"]
    print(f"machine: {machine_description()}")
    print(f"P = {p:,} weights, K = {args.rank}, {args.snapshots} snapshots, sample chunk {args.chunk}; MiB")
    print(
        "| kind | world | rank | nbytes | formula | peak rise: collect | save (one file) | sample chunk "
        "| collect / formula |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        formula = posterior_bytes(p, args.rank, 1) * r["local_params"] / p
        print(
            f"| {r['kind']} | {r['world']} | {r['rank']} | {r['nbytes'] / MiB:,.1f} | {formula / MiB:,.1f} "
            f"| {r['collect'] / MiB:,.1f} | {r['save'] / MiB:,.1f} | {r['sample'] / MiB:,.1f} "
            f"| {r['collect'] / formula:.2f} |"
        )
    single = rows[0]
    for kind in ("ddp", "fsdp2"):
        most = max((r for r in rows if r["kind"] == kind), key=lambda r: r["collect"])
        print(
            f"{kind}, world 2 / world 1, largest process: nbytes {most['nbytes'] / single['nbytes']:.3f}, "
            f"collect peak {most['collect'] / single['collect']:.3f}"
        )
    print(f"one-file posterior: {single['file'] / MiB:,.1f} MiB")
    print()
    print(
        f"On paper, the same formula at K = 20 ({3 * MOMENT_BYTES + 20 * DEVIATION_BYTES} bytes per weight in all):"
    )
    print("| weights | 1 process | 8 | 16 | 32 | 64 |")
    print("|---|---|---|---|---|---|")
    for name, values in paper_table():
        print(f"| {name} | " + " | ".join(_gb(v) for v in values) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
