"""Peak memory of one BMA call at 1,000 and 16,000 weight samples with ``chunk_size=10``.

Without ``return_samples`` the summaries are accumulated chunk by chunk, so the peak should not grow
with ``num_samples``. Each configuration runs in a fresh process; the number printed is the growth of
the peak resident set size (``ru_maxrss``) during the BMA call over the resident size just before
it (after a warm-up call with 10 samples), next to what stacking every sample's outputs would take.

    python benchmarks/output_memory.py            # 1,000 and 16,000 samples, a batch of 256 x 10 outputs
    python benchmarks/output_memory.py --quick    # 100 and 1,600 samples
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import psutil
import torch
from torch import nn

BATCH, FEATURES, CLASSES = 256, 32, 10


def _posterior(net: nn.Module, snapshots: int = 8, max_rank: int = 5):
    from lightning_swag import SWAGPosterior

    post = SWAGPosterior.from_model(net, max_rank=max_rank)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(snapshots):
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
            post.collect(net)
    return post


def measure(num_samples: int, chunk_size: int) -> dict[str, float]:
    """Peak RSS growth (MiB) of one BMA call in this process."""
    from lightning_swag import SWAGModule

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    post = _posterior(net)
    x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(1))
    bma = SWAGModule(net, post, num_samples=10, chunk_size=chunk_size, seed=0, task="classification")
    bma(x)  # warm-up: every lazy allocation of the library and of torch happens here
    bma.num_samples = num_samples
    before = psutil.Process().memory_info().rss
    out = bma(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert torch.isfinite(out["mean"]).all()
    stacked = num_samples * BATCH * CLASSES * 4
    return {"peak_growth_mib": max(peak - before, 0) / 2**20, "stacked_outputs_mib": stacked / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,600 samples")
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.chunk_size)))
        return
    counts = (100, 1600) if args.quick else (1000, 16000)
    rows = {}
    for count in counts:
        command = [sys.executable, __file__, "--child", str(count), "--chunk-size", str(args.chunk_size)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[count] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"BMA of a {BATCH} x {CLASSES} batch, chunk_size={args.chunk_size}, return_samples=False")
    print("| samples | peak growth (MiB) | all outputs stacked would be (MiB) |")
    print("|---|---|---|")
    for count, row in rows.items():
        print(f"| {count:,} | {row['peak_growth_mib']:.1f} | {row['stacked_outputs_mib']:.1f} |")
    low, high = (rows[c]["peak_growth_mib"] for c in counts)
    print(f"ratio of the peaks, {counts[1]:,} / {counts[0]:,} samples: {high / max(low, 0.1):.2f}")


if __name__ == "__main__":
    main()
