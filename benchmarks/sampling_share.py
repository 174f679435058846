"""How much of a ResNet-18 BMA is drawing the weight samples, and from how many images it is under 10%.

In one process, per thread count: ``SWAGPosterior.sample`` of ``--samples`` float32 weight vectors
(what ``SWAGModule`` draws once per run and keeps between batches), and ``SWAGModule`` on one batch
of ``--batch`` 32×32 images, sampling included (the "one batch" row of ``benchmarks/peers.py``).
The forward time per image is the difference divided by the batch size; the break-even point is the
number of images a predict run must cover for sampling to be at most 10% of it.

Usage::

    python benchmarks/sampling_share.py [--threads 1 2] [--repeats 3] [--samples 10] [--batch 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torchvision

from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.experiments.machine import machine_description


def recorded_posterior(model: torch.nn.Module, snapshots: int, rank: int) -> SWAGPosterior:
    """A posterior of ``snapshots`` perturbed copies of the model's weights (timings do not depend
    on the values)."""
    post = SWAGPosterior.from_model(model, max_rank=rank)
    walker = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(snapshots):
        with torch.no_grad():
            for p in walker.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=generator))
        post.collect(walker)
    return post


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    model = torchvision.models.resnet18(num_classes=10).eval()
    post = recorded_posterior(model, snapshots=30, rank=20)
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    print(machine_description())
    print(
        f"ResNet-18, P = {post.num_params:,}, K = 20, 30 snapshots; {args.samples} samples, one batch of {args.batch}"
    )
    print(
        "| threads | sampling | one-batch BMA | sampling share | forward per image | images for sampling ≤ 10% |"
    )
    print("|---|---|---|---|---|---|")
    seeds = iter(range(10**6))  # a fresh seed per call: nothing is reused between repetitions
    for threads in args.threads:
        torch.set_num_threads(threads)
        sampling = median_seconds(
            lambda: post.sample(args.samples, seed=next(seeds), dtype=torch.float32), args.repeats
        )

        def bma() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # BatchNorm without bn_loader: not what is timed here
                SWAGModule(model, post, num_samples=args.samples, seed=next(seeds))(x)

        total = median_seconds(bma, args.repeats)
        per_image = (total - sampling) / args.batch
        break_even = 9 * sampling / per_image  # sampling / (sampling + n·per_image) ≤ 0.1
        print(
            f"| {threads} | {sampling:.2f} s | {total:.2f} s | {sampling / total:.0%} | "
            f"{per_image * 1e3:.1f} ms | {break_even:,.0f} |"
        )


if __name__ == "__main__":
    main()
